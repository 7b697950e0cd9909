"""The metadata an exported depthkd model carries, so the runtime needs no side configuration (no torch, no onnx).

It is stored as one JSON object under the key "depthkd" of the ONNX model's `metadata_props` (and in the JSON
sidecar beside a TensorRT engine). This module is the one definition of its fields; `distill.verbs.export` writes it,
`depth_node.engine` reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from depth_node.onnx_file import external_data_problem

METADATA_KEY = "depthkd"
OUTPUT_KINDS = ("metric", "relative_depth", "relative_disparity")
PRECISIONS = ("fp32", "fp16", "int8")


class ModelLoadError(ValueError):
    """A model file cannot be used: missing, not a model, no/invalid depthkd metadata, or built for another runtime.

    The message names the file and the problem.
    """


@dataclass(frozen=True)
class ModelMetadata:
    """What the runtime must know to feed an exported model and read its outputs.

    Attributes:
        input_size: (H, W) pixels of the network input, or None when the model was exported with dynamic shapes.
        mean, std: per-channel RGB normalisation: the input is (image01 - mean) / std.
        min_depth, max_depth: metres; the range the model predicts (outputs are clamped to it).
        output_kind: "metric" (metres), "relative_depth" or "relative_disparity" (unitless).
        bins: number of depth bins (adaptive-bins head), 0 for a plain regression head.
        arch: student/teacher architecture name, e.g. "efficientnet_b0".
        config_hash: short hash of the training config that produced the weights ("" if unknown).
        version: depthkd version that exported the model.
        dynamic: True when batch, height and width are dynamic axes.
        size_divisor: input H and W must be multiples of this (matters for dynamic models).
        precision: "fp32", "fp16" (FP16 compute, float32 inputs/outputs) or "int8" (static QDQ quantization);
            inputs and outputs are float32 at every precision.
        random_init: True for an untrained student (`distill export --random-init`: benchmarks and tests).
        outputs: output tensor names: "depth" (B, 1, H, W), plus "confidence" (B, 1, H, W) in [0, 1] with bins.
        input_layout, color, input_range, depth_units: fixed conventions, stored so the artifact documents itself.
    """

    input_size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_depth: float
    max_depth: float
    output_kind: str
    bins: int = 0
    arch: str = ""
    config_hash: str = ""
    version: str = ""
    dynamic: bool = False
    size_divisor: int = 32
    precision: str = "fp32"
    random_init: bool = False
    outputs: tuple[str, ...] = field(default=())
    input_layout: str = "NCHW"
    color: str = "RGB"
    input_range: str = "0-1 then (x-mean)/std"
    depth_units: str = "m"

    def __post_init__(self) -> None:
        if not self.outputs:
            object.__setattr__(self, "outputs", ("depth", "confidence") if self.bins else ("depth",))
        for problem in _problems(self):
            raise ValueError(f"invalid depthkd metadata: {problem}")

    def to_json(self) -> str:
        """One-line JSON object; input_size is [H, W] or null."""
        data = asdict(self)
        data["input_size"] = list(self.input_size) if self.input_size else None
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str = "<metadata>") -> ModelMetadata:
        """Parse and validate; errors are `ModelLoadError` naming `source` (the model file)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{source}: depthkd metadata is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: depthkd metadata must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<metadata>") -> ModelMetadata:
        """Validate a decoded metadata object; unknown keys are ignored so newer exports still load."""
        known = {f.name for f in fields(cls)}
        required = {"input_size", "mean", "std", "min_depth", "max_depth", "output_kind"}
        missing = sorted(required - data.keys())
        if missing:
            raise ModelLoadError(f"{source}: depthkd metadata lacks {', '.join(missing)}")
        kwargs = {key: value for key, value in data.items() if key in known}
        size = kwargs["input_size"]
        try:
            if size is not None and (list(size) == [-1, -1] or kwargs.get("dynamic")):
                size = None
            kwargs["input_size"] = None if size is None else tuple(int(v) for v in size)
            kwargs["mean"] = tuple(float(v) for v in kwargs["mean"])
            kwargs["std"] = tuple(float(v) for v in kwargs["std"])
            kwargs["outputs"] = tuple(str(v) for v in kwargs.get("outputs", ()))
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ModelLoadError(f"{source}: {error}") from None


def _problems(meta: ModelMetadata) -> list[str]:
    """Every way `meta` breaks the contract (empty when valid)."""
    problems = []
    if meta.input_size is not None and (len(meta.input_size) != 2 or min(meta.input_size) <= 0):
        problems.append(f"input_size must be [H, W] > 0 or null, got {meta.input_size}")
    if meta.input_size is None and not meta.dynamic:
        problems.append("input_size is null but dynamic is false")
    if len(meta.mean) != 3 or len(meta.std) != 3 or min(meta.std) <= 0:
        problems.append(f"mean/std must be 3 values with std > 0, got mean={meta.mean} std={meta.std}")
    if not (math.isfinite(meta.min_depth) and math.isfinite(meta.max_depth) and 0 <= meta.min_depth < meta.max_depth):
        problems.append(f"need 0 <= min_depth < max_depth, got {meta.min_depth}, {meta.max_depth}")
    if meta.output_kind not in OUTPUT_KINDS:
        problems.append(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {meta.output_kind!r}")
    if meta.precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {meta.precision!r}")
    if meta.bins < 0 or meta.size_divisor < 1:
        problems.append(f"bins must be >= 0 and size_divisor >= 1, got {meta.bins}, {meta.size_divisor}")
    expected = ("depth", "confidence") if meta.bins else ("depth",)
    if tuple(meta.outputs) != expected:
        problems.append(f"outputs must be {list(expected)} for bins={meta.bins}, got {list(meta.outputs)}")
    if (meta.input_layout, meta.color, meta.depth_units) != ("NCHW", "RGB", "m"):
        problems.append(f"unsupported layout/color/units {meta.input_layout}/{meta.color}/{meta.depth_units}")
    return problems


def metadata_from_map(custom_metadata: dict[str, str], source: str) -> ModelMetadata:
    """The depthkd metadata from an ONNX model's metadata_props (as ONNX Runtime's custom_metadata_map gives it)."""
    if METADATA_KEY not in custom_metadata:
        raise ModelLoadError(
            f"{source}: no '{METADATA_KEY}' metadata in the model: export it with `distill export` "
            "(other ONNX models do not say their input size, normalisation and depth units)"
        )
    return ModelMetadata.from_json(custom_metadata[METADATA_KEY], source)


def read_onnx_metadata(path: str | Path) -> ModelMetadata:
    """Read the depthkd metadata of an ONNX file with ONNX Runtime (no `onnx` import)."""
    import onnxruntime as ort

    path = Path(path)
    check_onnx_file(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the metadata is wanted
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types for corrupt files
        raise ModelLoadError(f"{path}: not a readable ONNX model ({error_summary(error)})") from None
    return metadata_from_map(session.get_modelmeta().custom_metadata_map, str(path))


def check_onnx_file(path: Path) -> None:
    """Raise ModelLoadError unless `path` is a file ONNX Runtime may open: it exists and its external data (if
    any) stays inside its folder (`onnx_file.external_data_problem`)."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    problem = external_data_problem(path)
    if problem:
        raise ModelLoadError(f"{path}: {problem}")


def error_summary(error: BaseException) -> str:
    """First line of an exception's message (library errors can span pages), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
