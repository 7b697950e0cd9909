"""`distill info`: parameter counts and FLOPs of a student, a teacher or a trained checkpoint.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one forward pass of a (1, 3, H, W) image:
2 FLOPs per multiply-accumulate of convolutions, matrix products and attention, so GFLOPs = FLOPs / 1e9 is twice the
"GMACs" many papers quote. Elementwise ops, normalisation, activations and resizes are not counted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.errors import UserError
from distill.models.loading import load_model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_by_module(model: nn.Module, size: tuple[int, int]) -> dict[str, int]:
    """FLOPs of one forward pass at (H, W) = `size`, batch 1, per submodule name ("" is the whole model)."""
    params = list(model.parameters())
    image = torch.zeros(1, 3, *size, device=params[0].device if params else "cpu")
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(image)
    finally:
        model.train(was_training)
    root = type(model).__name__ + "."
    flops = {"": counter.get_total_flops()}
    for name, per_op in counter.get_flop_counts().items():
        if name.startswith(root):
            flops[name[len(root) :]] = sum(per_op.values())
    return flops


def count_flops(model: nn.Module, size: tuple[int, int]) -> float:
    """GFLOPs (FLOPs / 1e9, 2 per multiply-accumulate) of one forward pass of a (1, 3, H, W) image."""
    return flops_by_module(model, size)[""] / 1e9


def model_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level parts by dotted name, looking through single-child wrappers (e.g. an HF teacher)."""
    prefix, children = "", list(model.named_children())
    while len(children) == 1:
        name, only = children[0]
        prefix, children = f"{prefix}{name}.", list(only.named_children())
    return [(prefix + name, child) for name, child in children]


def resolve_model(spec: str, size: tuple[int, int], **head: int) -> nn.Module:
    """Build what `distill info` was given: a teacher spec (built for `size`), a checkpoint path or a student arch;
    `head` (decoder_width, bins) sizes the depth head of a name or spec (a checkpoint has its own)."""
    return load_model(spec, img_size=size, **head).model


def padded_size(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """`size` rounded up to the model's size_divisor, as `distill export` edge-pads a fixed input inside its graph."""
    divisor = int(getattr(model, "size_divisor", 1))
    return (size[0] + -size[0] % divisor, size[1] + -size[1] % divisor)


def info_table(model: nn.Module, size: tuple[int, int]) -> list[tuple[str, float, float | None]]:
    """Rows (part, params in millions, GFLOPs or None when not countable), the last one "total"."""
    divisor = getattr(model, "size_divisor", 1)
    if size[0] % divisor or size[1] % divisor:
        fit = tuple(max(divisor, round(side / divisor) * divisor) for side in size)
        raise UserError(f"size {size[0]}x{size[1]} is not a multiple of {divisor}; try {fit[0]}x{fit[1]}")
    parts = model_parts(model)
    if count_parameters(model) == 0:  # black-box teachers (ONNX, precomputed) run outside torch
        return [(name, 0.0, None) for name, _ in parts] + [("total", 0.0, None)]
    flops = flops_by_module(model, size)
    part_flops = [part_total(flops, name) for name, _ in parts]
    rows = [(name, count_parameters(part) / 1e6, f / 1e9) for (name, part), f in zip(parts, part_flops)]
    if flops[""] > sum(part_flops):  # ops the model runs outside its parts (functional calls in its forward)
        rows.append(("other", 0.0, (flops[""] - sum(part_flops)) / 1e9))
    rows.append(("total", count_parameters(model) / 1e6, flops[""] / 1e9))
    return rows


def describe_head(model: nn.Module) -> str:
    """ " (decoder width 128, 256 bins)" from the model's spec, or "" when it has no depth head of that kind."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict) or "decoder_width" not in spec:
        return ""
    bins = spec.get("bins")
    return f" (decoder width {spec['decoder_width']}" + (f", {bins} bins)" if bins else ", no bins)")


def part_total(flops: dict[str, int], name: str) -> int:
    """FLOPs of submodule `name`; when it was not called as a module (e.g. a timm `forward_intermediates`), the sum
    over its outermost submodules that were."""
    if name in flops:
        return flops[name]
    inside = [key for key in flops if key.startswith(name + ".")]
    outermost = [key for key in inside if not any(key.startswith(other + ".") for other in inside)]
    return sum(flops[key] for key in outermost)


def print_info(
    model: str, size: tuple[int, int] = (352, 1216), decoder_width: int | None = None, bins: int | None = None
) -> None:
    """Print params (M) and GFLOPs at HxW of a student arch, teacher spec or checkpoint, per top-level part.

    A size off the model's divisor is counted as the export runs it: edge-padded up to the next multiple.
    decoder_width, bins: the depth head of a name or spec (None: the defaults of config/default.yaml's model:).
    """
    head = {key: value for key, value in (("decoder_width", decoder_width), ("bins", bins)) if value is not None}
    built = resolve_model(model, size, **head)
    run = padded_size(built, size)
    rows = info_table(built, run)
    width = max(len(name) for name, _, _ in rows)
    print(f"{model}{describe_head(built)} at {size[0]}x{size[1]} (HxW), batch 1")
    if run != tuple(size):
        divisor = built.size_divisor
        print(f"counted at {run[0]}x{run[1]}: edge-padded to a multiple of {divisor}, as distill export does")
    print(f"{'part':<{width}}  {'params (M)':>10}  {'GFLOPs':>8}")
    for name, params, gflops in rows:
        shown = "n/a" if gflops is None else f"{gflops:.2f}"
        print(f"{name:<{width}}  {params:>10.2f}  {shown:>8}")
    print("GFLOPs: 2 per multiply-accumulate of conv/matmul/attention (torch FlopCounterMode); elementwise not counted")
