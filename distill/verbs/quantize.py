"""INT8 and FP16 versions of an exported FP32 ONNX model, made with ONNX Runtime's own tools.

`quantize_int8`: static QDQ quantization (`onnxruntime.quantization.quantize_static`) after ORT's pre-processing
(`quant_pre_process`: shape inference, constant folding, Conv+BN fusion): per-channel symmetric INT8 weights and
per-tensor UINT8 activations whose ranges are calibrated on images (MinMax, entropy or percentile, `CALIB_METHODS`).
The images are preprocessed exactly as the node does (`distill.verbs.calibration.calibration_batches`), so the
ranges are those the model sees on the robot. `convert_fp16`: FP16 weights and compute
(`onnxruntime.transformers.float16`) for GPU execution providers, with float32 inputs and outputs.

Both copy the FP32 model's depthkd metadata with `precision` set, so `depth_node` and `distill bench` run the result
unchanged. `distill export --int8/--fp16` calls them; so can benchmarks and training code:

    from distill.verbs.quantize import quantize_int8, convert_fp16, precision_path
    quantize_int8(fp32, precision_path(fp32, "int8"), calibration_images("data/my_robot.mcap"))
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from depth_node.metadata import METADATA_KEY, PRECISIONS, ModelMetadata, read_onnx_metadata
from distill.errors import UserError
from distill.verbs.calibration import calibration_batches

CALIB_METHODS = ("minmax", "entropy", "percentile")
# Chosen on the synthetic world's validation split (benchmarks/quantization.py, results/quantization.json).
DEFAULT_CALIB_METHOD = "minmax"
CALIB_IMAGES = 64  # ORT keeps every calibration activation in memory for the histogram methods
HEAD_NODES = "/model/head/bins/"  # name prefix of the bins head's nodes in a `distill export` graph


def precision_path(fp32_onnx: Path | str, precision: str) -> Path:
    """Where the `precision` version of an exported model goes: `<stem>_<precision>.onnx` beside it."""
    fp32_onnx = Path(fp32_onnx)
    return fp32_onnx.with_name(f"{fp32_onnx.stem}_{precision}.onnx")


def quantize_int8(
    fp32_onnx: Path | str,
    out_path: Path | str,
    images: Iterable[np.ndarray],
    method: str = DEFAULT_CALIB_METHOD,
    *,
    size: tuple[int, int] | None = None,
    max_images: int = CALIB_IMAGES,
    keep_float: Sequence[str] = (),
) -> Path:
    """Write a static INT8 (QDQ) version of a `distill export` ONNX model, calibrated on `images`.

    Args:
        fp32_onnx: an FP32 model written by `distill export` (its metadata gives mean/std and input size).
        out_path: the INT8 model's path.
        images: (H, W, 3) uint8 RGB calibration images, e.g. `distill.verbs.calibration.calibration_images(DATA)`;
            any size (resized as the node does). Use frames the model will see, never the test split.
        method: "minmax", "entropy" or "percentile" (99.999th percentile of |activation|).
        size: (H, W) calibration input size of a dynamic model (ignored for fixed-size models).
        max_images: at most this many images are used.
        keep_float: node-name prefixes left in float (e.g. `HEAD_NODES`, ORT's `nodes_to_exclude`).

    Returns:
        out_path. Raises UserError for an unknown method or no usable images.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise UserError(f"--calib-method: unknown method {method!r} (choose from {', '.join(CALIB_METHODS)})")
    metadata = read_onnx_metadata(fp32_onnx)
    size = metadata.input_size or size
    if size is None:
        raise ValueError(f"{fp32_onnx} has dynamic input size: pass size=(H, W) for calibration")
    batches = calibration_batches(images, metadata, size, batch_size=1, limit=max_images)
    first = next(batches, None)
    if first is None:
        raise UserError("no usable images for INT8 calibration")
    reader = _BatchReader(itertools.chain([first], batches))
    with tempfile.TemporaryDirectory(prefix="depthkd-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        _pre_process(Path(fp32_onnx), prepared)
        excluded = _nodes_named(prepared, keep_float)
        quantize_static(
            str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            nodes_to_exclude=excluded,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "CalibPercentile": 99.999},
        )  # fmt: skip
    _stamp(Path(out_path), dataclasses.replace(metadata, precision="int8"))
    return Path(out_path)


def convert_fp16(fp32_onnx: Path | str, out_path: Path | str) -> Path:
    """Write an FP16 version of a `distill export` ONNX model (for GPU execution providers: CUDA, TensorRT).

    Inputs and outputs stay float32 (`keep_io_types`), so the node feeds and reads it like the FP32 model; ORT's
    default block list keeps the ops without FP16 kernels (e.g. CumSum of the bins head) in float32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    metadata = read_onnx_metadata(fp32_onnx)
    converted = OnnxModel(convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True))
    converted.topological_sort()  # the converter appends the input casts after their consumers
    onnx.save(converted.model, str(out_path))
    _stamp(Path(out_path), dataclasses.replace(metadata, precision="fp16"))
    return Path(out_path)


class _BatchReader(CalibrationDataReader):
    """ORT's calibration reader over (1, 3, H, W) normalised batches, read once."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"image": batch}


def _pre_process(source: Path, target: Path) -> None:
    """ORT's recommended preparation: symbolic shape inference and graph optimisation (BN folding, constants)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(target), skip_symbolic_shape=False)


def _nodes_named(path: Path, prefixes: Sequence[str]) -> list[str]:
    if not prefixes:
        return []
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if node.name.startswith(tuple(prefixes))]


def _stamp(path: Path, metadata: ModelMetadata) -> None:
    """Replace the depthkd metadata of an ONNX file (the tools copy or drop it) and check the model."""
    import onnx

    if metadata.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {metadata.precision!r}")
    proto = onnx.load(str(path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, metadata.to_json())]:
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_precision(
    fp32_onnx: Path,
    precision: str,
    size: tuple[int, int],
    calib: Path | None,
    method: str | None = None,
    overwrite: bool = True,
) -> Path:
    """`distill export --int8/--fp16`: write `precision_path(fp32_onnx, precision)` and check its depth against the
    FP32 model on the first calibration images (`parity.PRECISION_TOLERANCE`); returns the path.

    Args:
        size: (H, W) the FP32 model was traced at (a dynamic model is calibrated and checked there).
        calib: calibration images (required for int8; see `distill.verbs.calibration.calibration_images`).
        method: calibration method (None: DEFAULT_CALIB_METHOD).
    """
    from distill.verbs.calibration import calibration_images
    from distill.verbs.parity import PRECISION_TOLERANCE, compare_precision, image_feeds

    path = precision_path(fp32_onnx, precision)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists (an earlier export): pass --force to replace it, or --out another folder")
    metadata = read_onnx_metadata(fp32_onnx)
    size = metadata.input_size or size
    if precision == "int8":
        method = method or DEFAULT_CALIB_METHOD
        print(f"quantizing to INT8 (static QDQ, per-channel weights, {method} calibration on {calib}) ...")
        quantize_int8(fp32_onnx, path, calibration_images(calib), method, size=size)
    else:
        convert_fp16(fp32_onnx, path)
    error = compare_precision(fp32_onnx, path, image_feeds(metadata.mean, metadata.std, size, calib))
    print(f"parity {precision} vs fp32 (ONNX Runtime): {error}")
    if not error.median_rel <= PRECISION_TOLERANCE[precision]:
        raise UserError(
            f"{path}: {precision} depth is {error.median_rel:.1%} off the FP32 model's (median, more than "
            f"{PRECISION_TOLERANCE[precision]:.0%}); the file is kept for inspection: calibrate on more images of "
            "your scenes, or try another --calib-method"
        )
    return path
