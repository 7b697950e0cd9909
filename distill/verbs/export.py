"""`distill export`: a checkpoint (or a random-init student) -> ONNX with embedded metadata, and a TensorRT engine.

The ONNX graph takes `image` (B, 3, H, W) float32, RGB normalised with the model's mean/std, and gives `depth`
(B, 1, H, W) metres (or relative units, see the metadata's output_kind) and, for models with depth bins,
`confidence` (B, 1, H, W) = the largest bin probability, bilinearly upsampled. Its `metadata_props["depthkd"]`
holds `depth_node.metadata.ModelMetadata`, so the runtime needs nothing else. Every export is checked against
PyTorch with ONNX Runtime (max relative error <= 1e-3) and ends by printing the commands that use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import distill
from depth_node.metadata import METADATA_KEY, ModelLoadError, ModelMetadata, read_onnx_metadata
from distill.errors import UserError
from distill.models import load_model
from distill.verbs.parity import PARITY_TOLERANCE, check_parity, extra_inputs, parity_inputs

FORMATS = ("onnx", "engine")
_CHECKPOINT_FILES = ("state.json", "model.safetensors")  # files that stand for their checkpoint folder


class ExportWrapper(nn.Module):
    """A DepthModel as the exported graph sees it: image (, extra inputs) -> depth (, confidence).

    `pad` = (bottom, right) pixels of edge padding added before the model and cropped from the outputs, so a fixed
    input size that is not a multiple of the model's size_divisor (e.g. 176x608 for a stride-32 encoder) exports.
    """

    def __init__(self, model: nn.Module, pad: tuple[int, int] = (0, 0)):
        super().__init__()
        self.model = model
        self.pad = pad

    def padded(self, image: torch.Tensor) -> torch.Tensor:
        """The image as the model sees it: edge-padded at the bottom/right by `pad`."""
        return F.pad(image, (0, self.pad[1], 0, self.pad[0]), mode="replicate") if any(self.pad) else image

    def forward(self, image: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        out = self.model(self.padded(image), *extra)
        depth = out.depth[..., :height, :width] if any(self.pad) else out.depth
        if out.probs is None:
            return depth
        confidence = out.probs.amax(dim=1, keepdim=True)
        confidence = F.interpolate(confidence, size=out.depth.shape[-2:], mode="bilinear", align_corners=False)
        return depth, confidence[..., :height, :width] if any(self.pad) else confidence


def run_export(
    checkpoint: Path | str | None,
    *,
    out: Path | str,
    formats: str = "onnx",
    size: tuple[int, int] = (352, 1216),
    dynamic: bool = False,
    fp16: bool = False,
    int8: bool = False,
    calib: Path | None = None,
    opset: int = 17,
    arch: str | None = None,
    random_init: bool = False,
    config: Path | None = None,
    calib_method: str | None = None,
    force: bool = False,
) -> list[Path]:
    """The `distill export` verb: a checkpoint (or a random-init student) to ONNX and/or a TensorRT engine.

    Args:
        checkpoint: checkpoint or run folder, or an exported .onnx to build an engine from; None with random_init.
        out: output folder.
        formats: comma-separated, "onnx", "engine" or both.
        size: (H, W) pixels of the exported input.
        dynamic: dynamic batch/height/width axes.
        fp16, int8: the precision of the ONNX model (`<name>_fp16.onnx` / `<name>_int8.onnx` beside the FP32 one)
            and of the TensorRT engine; int8 needs `calib`.
        calib: images, a dataset or a bag: INT8 calibration data and the parity checks' inputs.
        opset: ONNX opset version.
        arch, random_init: export an untrained student of this architecture (tests, benchmarks).
        config: with random_init, the training config whose `model:` section describes the student (instead of arch).
        calib_method: ONNX INT8 calibration, one of `quantize.CALIB_METHODS` (None: `DEFAULT_CALIB_METHOD`).
        force: replace an existing export of the same name (otherwise that is a UserError).

    Returns:
        The files written.
    """
    chosen = parse_formats(formats)
    if fp16 and int8:
        raise UserError("--fp16 and --int8 exclude each other: choose one precision per export")
    if int8 and calib is None:
        raise UserError("--int8 needs --calib DATA (a folder of images, a dataset or a rosbag) for calibration")
    if calib_method is not None and not (int8 and "onnx" in chosen):
        raise UserError("--calib-method sets the ONNX INT8 calibration: add --int8 (with --format onnx)")
    out = Path(out)
    written: list[Path] = []
    source = Path(checkpoint) if checkpoint is not None else None
    if source is not None and source.is_file() and not random_init and source.name not in _CHECKPOINT_FILES:
        onnx_path = _existing_onnx(source, chosen)  # an exported model: build the engine from it
        metadata = read_metadata_or_fail(onnx_path)
    else:
        model, run_config = load_for_export(source, arch=arch, random_init=random_init, config=config)
        if (int8 or fp16) and "onnx" in chosen:
            _check_reducible(model, calib_method)
        onnx_path, metadata = export_onnx(model, out, size, dynamic, opset, run_config, calib, overwrite=force)
        written.append(onnx_path)
        if (int8 or fp16) and "onnx" in chosen:
            from distill.verbs.quantize import export_precision

            precision = "int8" if int8 else "fp16"
            traced = _traced_size(size, metadata.size_divisor) if dynamic else size
            written.append(export_precision(onnx_path, precision, traced, calib, calib_method, overwrite=force))
    if "engine" in chosen:
        from distill.verbs.export_trt import build_engine

        precision = "int8" if int8 else "fp16" if fp16 else "fp32"
        out.mkdir(parents=True, exist_ok=True)
        written.append(build_engine(onnx_path, out, precision, metadata, size, calib=calib))
    print_usage(written)
    return written


def _check_reducible(model: nn.Module, calib_method: str | None) -> None:
    """FP16/INT8 ONNX takes image-only models and a known calibration method (checked before the FP32 export)."""
    from distill.verbs.quantize import CALIB_METHODS

    if calib_method is not None and calib_method not in CALIB_METHODS:
        raise UserError(f"--calib-method: unknown method {calib_method!r} (choose from {', '.join(CALIB_METHODS)})")
    if extra_inputs(model):
        raise UserError("--fp16/--int8 ONNX export takes image-only depth models, not a completion network")


def _traced_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """(H, W) a dynamic model is traced at: `size` rounded up to multiples of `divisor`."""
    return (-(-size[0] // divisor) * divisor, -(-size[1] // divisor) * divisor)


def parse_formats(text: str) -> list[str]:
    """ "onnx,engine" -> ["onnx", "engine"]; an unknown or empty format is a UserError."""
    formats = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        bad = ", ".join(unknown) or repr(text)
        raise UserError(f"--format: unknown format {bad} (choose from {', '.join(FORMATS)})")
    return formats


def _existing_onnx(path: Path, formats: list[str]) -> Path:
    if formats != ["engine"]:
        raise UserError(f"{path} is a model file, not a checkpoint folder: only --format engine can use it")
    return path


def read_metadata_or_fail(path: Path) -> ModelMetadata:
    """depthkd metadata of an ONNX file; a file that is not an exported ONNX model is a UserError."""
    try:
        return read_onnx_metadata(path)
    except ModelLoadError as error:
        raise UserError(str(error)) from None


def load_for_export(
    checkpoint: Path | None, *, arch: str | None = None, random_init: bool = False, config: Path | None = None
) -> tuple[nn.Module, dict]:
    """The model to export (eval mode, CPU) and the config describing it ("random_init": True for an untrained one)."""
    if config is not None and not random_init:
        raise UserError("--config describes an untrained student: add --random-init (a checkpoint has its own config)")
    if random_init:
        if checkpoint is not None:
            raise UserError(f"give either a checkpoint ({checkpoint}) or --random-init, not both")
        if config is not None:
            return _from_config(config, arch)
        if not arch:
            raise UserError("--random-init needs --arch NAME (a student architecture, e.g. efficientnet_b0) or "
                            "--config CONFIG (its model: section)")  # fmt: skip
        model, _ = load_model(arch)
        return model, {"arch": arch, "random_init": True}
    if checkpoint is None:
        raise UserError("give a CHECKPOINT folder to export (or --arch NAME --random-init for an untrained student)")
    if not Path(checkpoint).exists():
        raise UserError(f"checkpoint not found: {checkpoint}")
    return load_model(Path(checkpoint))


def _from_config(path: Path, arch: str | None) -> tuple[nn.Module, dict]:
    """The untrained model a training config's `model:` section describes (its weights keys ignored)."""
    from distill.config import load_config, to_dict
    from distill.training.run import build_model_from_config

    if arch:
        raise UserError(f"give either --arch {arch} or --config {path} (its model.arch), not both")
    if not Path(path).is_file():
        raise UserError(f"--config: {path} not found")
    config = load_config(path, ["model.weights=null", "model.encoder_weights=null"], check_paths=False)
    return build_model_from_config(config).eval(), {**to_dict(config), "random_init": True}


def model_arch(model: nn.Module, config: dict) -> str:
    """Architecture name for metadata: the spec's student arch or teacher spec, else the config's, else the spec's
    kind, else the class name."""
    spec = getattr(model, "spec", None)
    for source in (spec if isinstance(spec, dict) else {}, config, config.get("model") or {}):
        for key in ("arch", "spec"):
            if isinstance(source, dict) and isinstance(source.get(key), str):
                return source[key]
    kind = spec.get("kind") if isinstance(spec, dict) else None  # e.g. "completion": one architecture, no name
    return kind if isinstance(kind, str) else type(model).__name__.lower()


def config_hash(config: dict) -> str:
    """Short stable hash of a (resolved) config dict."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def export_onnx(
    model: nn.Module,
    out_dir: Path,
    size: tuple[int, int],
    dynamic: bool,
    opset: int,
    config: dict,
    calib: Path | None = None,
    overwrite: bool = True,
) -> tuple[Path, ModelMetadata]:
    """Write `<arch>_<H>x<W>.onnx` (or `<arch>_dynamic.onnx`) into out_dir, checked and parity-tested.

    Args:
        model: a DepthModel in eval mode.
        size: (H, W) of the traced input (the fixed input size unless dynamic). A fixed size that is not a multiple
            of model.size_divisor is edge-padded inside the graph; a dynamic model is traced at the next multiple
            (its graph takes any multiple).
        dynamic: batch, height and width become dynamic axes.
        opset: ONNX opset version.
        config: the run's resolved config (hashed into the metadata).
        calib: optional image source; its first images are the parity check's inputs.
        overwrite: replace an existing file of the same name; False makes that a UserError.
    """
    divisor = int(getattr(model, "size_divisor", 32))
    pad = (-size[0] % divisor, -size[1] % divisor)
    if dynamic and any(pad):
        size = (size[0] + pad[0], size[1] + pad[1])
        print(f"--dynamic: traced at {size[0]}x{size[1]}; the graph takes any height and width that are multiples "
              f"of {divisor}")  # fmt: skip
        pad = (0, 0)
    if any(pad) and extra_inputs(model):
        raise UserError(
            f"--size {size[0]}x{size[1]}: for a model with inputs besides the image, height and width must be "
            f"multiples of {divisor}"
        )
    wrapper = ExportWrapper(model, pad).eval()
    samples = parity_inputs(model, size, calib)
    with torch.no_grad():
        first = [torch.from_numpy(value) for value in samples[0].values()]
        probs = model(wrapper.padded(first[0]), *first[1:]).probs
    metadata = describe(model, size, dynamic, config, bins=0 if probs is None else int(probs.shape[1]))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "-", metadata.arch)  # "timm:vit_small..." -> "timm-vit_small..."
    path = Path(out_dir) / (f"{stem}_dynamic.onnx" if dynamic else f"{stem}_{size[0]}x{size[1]}.onnx")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists (an earlier export): pass --force to replace it, or --out another folder")
    check_export_size(model, metadata.arch, wrapper.padded(first[0]).shape[-2:], dynamic)
    _trace_to_onnx(wrapper, samples[0], path, list(metadata.outputs), dynamic, opset)

    _finish_onnx(path, metadata)
    if dynamic:  # a second size proves the graph really follows its input size
        half = (max(divisor, size[0] // 2 // divisor * divisor), max(divisor, size[1] // 2 // divisor * divisor))
        samples = samples + parity_inputs(model, half, None)[:1]
    error = check_parity(wrapper, path, samples)
    source = "images from " + str(calib) if calib else "random smooth images (--calib DIR checks on your images)"
    print(f"parity ONNX Runtime vs PyTorch: max relative error {error:.2e} on {len(samples)} {source}")
    if not error <= PARITY_TOLERANCE:
        raise UserError(
            f"{path}: ONNX Runtime disagrees with PyTorch (max relative error {error:.2e} > {PARITY_TOLERANCE}); "
            "the file is kept for inspection"
        )
    return path, metadata


def built_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) a teacher that resizes absolute position embeddings (ViT, hybrid) was built for; None for any other
    model, which takes every size its divisor allows."""
    spec = getattr(model, "spec", None)
    built = spec.get("img_size") if isinstance(spec, dict) else None
    if not built or not any(name.endswith("pos_embed") for name, _ in model.named_parameters()):
        return None
    return int(built[0]), int(built[1])


def check_export_size(model: nn.Module, arch: str, traced: Sequence[int], dynamic: bool) -> None:
    """A ViT teacher resizes its position embeddings (antialiased bicubic) at any size but the one it was built for,
    which ONNX cannot express: one UserError naming the size to export at, before the exporter fails."""
    built = built_size(model)
    if built is None or (built == tuple(int(side) for side in traced) and not dynamic):
        return
    how = "without --dynamic, " if dynamic else ""
    raise UserError(
        f"{arch} was built for {built[0]}x{built[1]} and resizes its position embeddings at any other size, which "
        f"ONNX cannot express: export it {how}with --size {built[0]}x{built[1]}"
    )


def describe(model: nn.Module, size: tuple[int, int], dynamic: bool, config: dict, bins: int) -> ModelMetadata:
    """The metadata embedded in the exported model (see depth_node.metadata.ModelMetadata)."""
    return ModelMetadata(
        input_size=None if dynamic else (int(size[0]), int(size[1])),
        mean=tuple(float(v) for v in model.mean),
        std=tuple(float(v) for v in model.std),
        min_depth=float(model.min_depth),
        max_depth=float(model.max_depth),
        output_kind=str(model.output_kind),
        bins=bins,
        arch=model_arch(model, config),
        config_hash=config_hash(config),
        version=distill.__version__,
        dynamic=bool(dynamic),
        size_divisor=int(getattr(model, "size_divisor", 32)),
        random_init=bool(config.get("random_init", False)),
    )


def _finish_onnx(path: Path, metadata: ModelMetadata) -> None:
    """Simplify, embed the metadata and check the traced file in place."""
    import onnx

    proto = _simplify(onnx.load(str(path)))
    for output in proto.graph.output:  # the tracer leaves the channel axis symbolic when other axes are dynamic
        output.type.tensor_type.shape.dim[1].dim_value = 1
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=metadata.to_json())
    proto.producer_name, proto.producer_version = "depthkd", distill.__version__
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _trace_to_onnx(wrapper: nn.Module, sample: dict, path: Path, outputs: list[str], dynamic: bool, opset: int):
    axes = {0: "batch", 2: "height", 3: "width"}
    dynamic_axes = {name: axes for name in [*sample, *outputs]} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo, which does not yet export every timm model.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # harmless, from the exporter
        torch.onnx.export(
            wrapper,
            tuple(torch.from_numpy(value) for value in sample.values()),
            str(path),
            input_names=list(sample),
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _simplify(proto):
    """Fold and fuse the graph with onnxslim when it is installed (optional: ORT optimises at load anyway)."""
    if importlib.util.find_spec("onnxslim") is None:
        return proto
    import onnxslim

    return onnxslim.slim(proto)


def print_usage(paths: list[Path]) -> None:
    """What was written and the commands that run it (the node, its launch file, the benchmark)."""
    if not paths:
        return
    print("exported:")
    for path in paths:
        print(f"  {path}")
    model = paths[-1].resolve()
    print("run it:")
    if model.suffix == ".onnx" and read_onnx_metadata(model).arch == "completion":  # stage 3, not a depth model
        print(f"  python -c \"from depth_node.completion import CompletionRunner; CompletionRunner('{model}')\"")
        print("  in the node's pipeline: DepthPipeline(engine, options, completion=CompletionRunner(path))")
        print("  python benchmarks/completion.py")
        return
    print(
        f"  depth_node --ros-args --params-file config/kitti.yaml -p model:={model} "
        "-r image:=/kitti/camera_color_left/image_raw -r camera_info:=/kitti/camera_color_left/camera_info"
    )
    print(f"  ros2 launch depth_node kitti.launch.py model:={model}")
    print(f"  distill bench {model}")
