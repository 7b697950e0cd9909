"""`hf:<folder>[?output_kind=<kind>&size=processor|train|<H>x<W>]`: a `transformers` depth-estimation model, run as
it is.

The folder is what `save_pretrained` writes (DPT, Depth Anything V1/V2, GLPN, ZoeDepth, ...), loaded offline. The
teacher gives depth and, as features, the 4 backbone stages the model's own decoder reads. By default it runs at the
size its own image processor would give it (`size=processor`: Depth Anything's 518 px short side at the input's
aspect, sides multiples of 14, e.g. 518x1792 for a 352x1216 KITTI crop), and its depth is resized back to the input.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from depth_node.metadata import error_summary
from distill.errors import UserError, did_you_mean
from distill.models.base import IMAGENET_MEAN, IMAGENET_STD, DepthModel, DepthOutput
from distill.models.teachers._external import nearest_multiple, read_json, resize
from distill.models.teachers._scheme import OUTPUT_KIND, Option, register_teacher
from distill.parsing import parse_size

InputSize = tuple[int, int] | Literal["processor", "train"]

# Families whose predicted_depth is in metres; the others (DPT/MiDaS, relative Depth Anything, Depth Pro's
# canonical inverse depth) predict relative disparity.
HF_METRIC_TYPES = ("glpn", "zoedepth")
# What a folder without preprocessor_config.json gets: its family's image processor defaults (DPTImageProcessor
# normalises with 0.5; GLPNImageProcessor does not normalise and rounds sizes to multiples of 32, which its decoder
# needs). Other families: ImageNet mean/std, sizes in multiples of the patch size.
HF_DEFAULT_PROCESSORS = {
    "dpt": {"image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "glpn": {"do_normalize": False, "size_divisor": 32},
}

log = logging.getLogger(__name__)


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT tokens (B, N, C) -> (B, C, gh, gw), dropping the N - gh*gw leading CLS/register tokens.

    (B, C, h, w) maps (convolutional stages) pass through unchanged.
    """
    if tokens.dim() == 4:
        return tokens
    gh, gw = grid
    extra = tokens.shape[1] - gh * gw
    if extra < 0:
        raise RuntimeError(f"{tokens.shape[1]} tokens do not fill a {gh}x{gw} patch grid")
    return tokens[:, extra:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


class HFTeacher(DepthModel):
    """A `transformers` depth-estimation model saved in a local folder.

    The input is resized to the size the model runs at (`internal_size`) and the depth resized back, so any input
    size works (`size_divisor` is 1): a `size=HxW` option; else the size the model requires (DPT-ViT/hybrid's
    square `config.image_size`); else with `size=processor` (default) the size its image processor gives
    (`processor_size`); else (`size=train`, or no processor size) the input size rounded to the nearest multiple
    of the patch size.
    Features are the 4 backbone stages the model's decoder (neck) reads, as (B, C, h, w) maps at the patch grid of
    the resized input; models without a neck give their last 4 hidden states.

    Args:
        folder: the `save_pretrained` folder (config.json, weights, optional preprocessor_config.json).
        kind: output kind overriding the one the config implies, or None.
        size: (H, W) pixels the model runs at whatever the input size, "processor" or "train" (see above).
        min_depth, max_depth: metres, the caller's range; a metric model's config.max_depth wins over max_depth.
    """

    size_divisor = 1

    def __init__(self, folder: Path, *, kind: str | None, size: InputSize, min_depth: float, max_depth: float):
        super().__init__()
        self.model = _load_hf_model(folder).eval()
        config = self.model.config
        processor_path = folder / "preprocessor_config.json"
        processor = (
            read_json(processor_path) if processor_path.is_file() else HF_DEFAULT_PROCESSORS.get(config.model_type)
        )
        metric = getattr(config, "depth_estimation_type", None) == "metric" or config.model_type in HF_METRIC_TYPES
        self.output_kind = kind or ("metric" if metric else "relative_disparity")
        self.mean, self.std = _hf_mean_std(processor)
        self.patch_size = _hf_patch_size(config)
        self.multiple = math.lcm(
            self.patch_size, *(int((processor or {}).get(key) or 1) for key in ("ensure_multiple_of", "size_divisor"))
        )
        self.size = size
        self.model_size = _hf_model_size(config)
        self.processor_target = _hf_processor_target(processor)
        self.min_depth = min_depth
        declared_max = getattr(config, "max_depth", None)
        self.max_depth = float(declared_max) if metric and declared_max else max_depth
        self._neck_inputs: list[torch.Tensor] = []
        self._feature_info: tuple[list[int], list[int]] | None = None
        neck = getattr(self.model, "neck", None)
        if neck is not None:
            neck.register_forward_pre_hook(self._capture_neck_inputs)

    def _capture_neck_inputs(self, module: torch.nn.Module, args: tuple) -> None:
        self._neck_inputs = list(args[0])

    def internal_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the wrapped model runs at for an input of (height, width) pixels (see the class docstring)."""
        if isinstance(self.size, tuple):
            return self.size
        if self.model_size is not None:
            return self.model_size
        if self.size == "processor" and self.processor_target is not None:
            return self.processor_size(height, width)
        return nearest_multiple(height, width, self.multiple)

    def processor_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the model's image processor resizes a (height, width) image to.

        DPTImageProcessor's rule (`get_resize_output_image_size`, which Depth Anything and ZoeDepth use): with
        keep_aspect_ratio, one scale for both sides, the one closer to 1 of target/side per side, then each side
        rounded to the nearest multiple; else the target size itself.
        """
        (target_h, target_w), keep_aspect = self.processor_target
        if not keep_aspect:
            return target_h, target_w
        scale_h, scale_w = target_h / height, target_w / width
        scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        return nearest_multiple(scale * height, scale * width, self.multiple)

    def forward(self, x: torch.Tensor, names: list[str] | None = None) -> DepthOutput:
        """x: (B, 3, H, W) normalised with `mean`/`std`. Returns depth (B, 1, H, W) and 4 feature maps."""
        size = self.internal_size(*(int(side) for side in x.shape[-2:]))  # ints, also while tracing an export
        has_neck = getattr(self.model, "neck", None) is not None
        out = self.model(pixel_values=resize(x, size), output_hidden_states=not has_neck)
        depth = resize(out.predicted_depth.unsqueeze(1), tuple(x.shape[-2:]))
        stages = self._neck_inputs if has_neck else list(out.hidden_states[-4:])
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        features = [tokens_to_map(stage, grid) for stage in stages]
        self._neck_inputs = []
        self._feature_info = ([f.shape[1] for f in features], [round(size[0] / int(f.shape[2])) for f in features])
        return DepthOutput(depth=depth, features=features)

    def _probe(self) -> tuple[list[int], list[int]]:
        if self._feature_info is None:
            side = 4 * self.multiple
            with torch.no_grad():
                self(torch.zeros(1, 3, side, side, device=next(self.model.parameters()).device))
        return self._feature_info

    def feature_channels(self) -> list[int]:
        return self._probe()[0]

    def feature_reductions(self) -> list[int]:
        """Nominal strides relative to the resized input (a fixed-size model's input is resized to that size)."""
        return self._probe()[1]


def _load_hf_model(folder: Path) -> torch.nn.Module:
    """The depth-estimation model saved in `folder`, all its weights loaded; any problem with the folder is a
    one-line UserError naming it (transformers' own messages and load reports span many lines)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForDepthEstimation  # lazy: transformers takes seconds to import

    config = _read_hf_config(folder)
    try:
        with _quiet_transformers():
            # float32 whatever the saved dtype: inputs come as float32; callers wanting fp16 use autocast.
            model, loading = AutoModelForDepthEstimation.from_pretrained(
                folder,
                config=config,
                local_files_only=True,
                dtype=torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except SafetensorError as error:
        raise UserError(
            f"{folder}: the safetensors weights are truncated or damaged ({error_summary(error)})"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"{folder}: cannot load a depth-estimation model ({error_summary(error)})") from None
    _check_loaded_weights(folder, loading)
    return model


def _read_hf_config(folder: Path) -> Any:
    """The folder's config.json as a transformers config; UserError if it is missing or invalid, or if its
    model_type is unknown to transformers or not a depth-estimation model."""
    from transformers import AutoConfig, __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES as DEPTH_MODELS

    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: not a Hugging Face model folder (no config.json); save one with save_pretrained")
    config = read_json(path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise UserError(f"{path}: no model_type; save the model with save_pretrained")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise UserError(
            f"{path}: model_type {model_type!r} is unknown to transformers {__version__}"
            f"{did_you_mean(model_type, DEPTH_MODELS)} (depth models: {', '.join(DEPTH_MODELS)})"
        )
    if model_type not in DEPTH_MODELS:
        raise UserError(
            f"{path}: a {model_type!r} model is not a depth-estimation model (depth models: {', '.join(DEPTH_MODELS)})"
        )
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # transformers and huggingface_hub validate fields with their own error types
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise UserError(f"{path}: invalid config ({message or type(error).__name__})") from None


def _check_loaded_weights(folder: Path, loading: dict[str, Any]) -> None:
    """Refuse weights that leave parts of the model config.json describes unloaded; warn of unused ones."""
    mismatched = sorted(loading["mismatched_keys"], key=str)
    if mismatched:
        key, saved, expected = mismatched[0]
        raise UserError(
            f"{folder}: the weights do not match config.json: {len(mismatched)} tensors have another shape "
            f"(e.g. {key}: {tuple(saved)} saved, {tuple(expected)} in config.json's model)"
        )
    missing = sorted(loading["missing_keys"])
    if missing:
        raise UserError(
            f"{folder}: the weights do not match config.json: {len(missing)} of the model's tensors are missing "
            f"(e.g. {missing[0]})"
        )
    unexpected = sorted(loading["unexpected_keys"])
    if unexpected:
        log.warning(
            "%s: %d saved tensors are not used by config.json's model (e.g. %s)", folder, len(unexpected), unexpected[0]
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports: `_load_hf_model` reports problems in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_mean_std(processor: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if processor is None:
        return IMAGENET_MEAN, IMAGENET_STD
    if processor.get("do_normalize", True) and "image_mean" in processor and "image_std" in processor:
        return tuple(processor["image_mean"]), tuple(processor["image_std"])
    return (0.0,) * 3, (1.0,) * 3


def _hf_patch_size(config) -> int:
    backbone = getattr(config, "backbone_config", None)
    patch = getattr(config, "patch_size", None) or getattr(backbone, "patch_size", None) or 1
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def _hf_processor_target(processor: dict | None) -> tuple[tuple[int, int], bool] | None:
    """((H, W) target, keep_aspect_ratio) of a resizing image processor, or None when it gives no size."""
    if processor is None or not processor.get("do_resize", True):
        return None
    size = processor.get("size", {})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or "height" not in size or "width" not in size:
        return None
    return (int(size["height"]), int(size["width"])), bool(processor.get("keep_aspect_ratio", False))


def _hf_model_size(config) -> tuple[int, int] | None:
    """The one input size the model itself accepts (DPT-ViT/hybrid's square grid), or None."""
    if config.model_type == "dpt" and (getattr(config, "backbone_config", None) is None or config.is_hybrid):
        return int(config.image_size), int(config.image_size)
    return None


def parse_input_size(text: str) -> InputSize:
    """`size` option: "processor", "train" or HEIGHTxWIDTH pixels."""
    return text if text in ("processor", "train") else parse_size(text)


@register_teacher(
    "hf",
    OUTPUT_KIND,
    Option(
        "size",
        parse_input_size,
        "what the model runs at: processor (default: its image processor's size), train (the input size rounded to "
        "the patch size) or HEIGHTxWIDTH pixels; the depth is resized back to the input",
    ),
    path=True,
)
def build_hf_teacher(
    folder: Path,
    *,
    img_size: Sequence[int],
    head_kw: dict[str, Any],
    output_kind: str | None = None,
    size: InputSize = "processor",
) -> HFTeacher:
    """Any input size works (see `HFTeacher`): `img_size` is unused."""
    return HFTeacher(
        folder, kind=output_kind, size=size, min_depth=head_kw["min_depth"], max_depth=head_kw["max_depth"]
    )
