"""`onnx:<file>[?output_kind=<kind>&min_depth=<m>&max_depth=<m>&device=cpu|cuda]`: a black-box ONNX depth model.

Run with ONNX Runtime: depth only, no features, no gradients. Its depthkd metadata (as `distill export` writes it)
declares what it needs; the spec's options override what it declares.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depth_node.metadata import METADATA_KEY, ModelMetadata, error_summary
from distill.errors import UserError
from distill.models.base import IMAGENET_MEAN, IMAGENET_STD, DepthModel, DepthOutput
from distill.models.teachers._external import nearest_multiple, resize
from distill.models.teachers._scheme import OUTPUT_KIND, Option, register_teacher

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OnnxTeacher(DepthModel):
    """A black-box ONNX depth model run with ONNX Runtime (response only: no features, no gradients).

    Its depthkd metadata (`depth_node.metadata.ModelMetadata`, as `distill export` writes it) gives mean/std, output
    kind, depth range and size divisor; a model without it is assumed to take ImageNet-normalised input and predict
    metric depth within the caller's range. Inputs are resized to the model's static height/width (or, for dynamic
    models, to the nearest multiple of the size divisor) and the depth resized back.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda", where ONNX Runtime runs it.
        output_kind: overrides the metadata's (or "metric"), or None.
        min_depth, max_depth: metres, overriding the metadata's (or the caller's) range; None keeps it.
        default_range: metres, the caller's (min_depth, max_depth), used when the model has no metadata.
    """

    size_divisor = 1

    def __init__(
        self,
        path: Path,
        *,
        device: str = "cpu",
        output_kind: str | None = None,
        min_depth: float | None = None,
        max_depth: float | None = None,
        default_range: tuple[float, float] = (1e-3, 80.0),
    ):
        super().__init__()
        self.session = _onnx_session(path, device)
        meta = _onnx_metadata(self.session, path)
        self.mean, self.std = (meta.mean, meta.std) if meta else (IMAGENET_MEAN, IMAGENET_STD)
        self.output_kind = output_kind or (meta.output_kind if meta else "metric")
        declared = (meta.min_depth, meta.max_depth) if meta else default_range
        self.min_depth = float(declared[0] if min_depth is None else min_depth)
        self.max_depth = float(declared[1] if max_depth is None else max_depth)
        self.multiple = meta.size_divisor if meta else 1
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        batch, _, height, width = model_input.shape
        self.static_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        self.static_batch = batch if isinstance(batch, int) else None
        output_names = [output.name for output in self.session.get_outputs()]
        self.output_name = "depth" if "depth" in output_names else output_names[0]

    def internal_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the ONNX model runs at for an input of (height, width) pixels."""
        return self.static_size or nearest_multiple(height, width, self.multiple)

    def forward(self, x: torch.Tensor, names: list[str] | None = None) -> DepthOutput:
        """x: (B, 3, H, W) normalised with `mean`/`std`. Returns depth (B, 1, H, W) on x's device."""
        size = tuple(x.shape[-2:])
        pixels = resize(x.detach().float(), self.internal_size(*size)).cpu().numpy().astype(self.input_dtype)
        step = self.static_batch or len(pixels)
        chunks = [
            self.session.run([self.output_name], {self.input_name: pixels[i : i + step]})[0]
            for i in range(0, len(pixels), step)
        ]
        depth = torch.from_numpy(np.concatenate(chunks).astype(np.float32))
        depth = depth.reshape(len(pixels), 1, *depth.shape[-2:])
        return DepthOutput(depth=resize(depth, size).to(x.device))


def _onnx_session(path: Path, device: str):
    import onnxruntime as ort  # lazy: only ONNX teachers need it

    if not path.is_file():
        raise UserError(f"{path}: ONNX file not found")
    try:
        return ort.InferenceSession(str(path), providers=PROVIDERS[device])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types for bad files
        raise UserError(f"{path}: cannot load the ONNX model ({error_summary(error)})") from None


def _onnx_metadata(session, path: Path) -> ModelMetadata | None:
    """The model's depthkd metadata, None when it has none; invalid metadata raises UserError."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        return None
    try:
        return ModelMetadata.from_json(text, str(path))
    except ValueError as error:  # ModelLoadError is a ValueError
        raise UserError(str(error)) from None


def _parse_device(text: str) -> str:
    if text not in PROVIDERS:
        raise ValueError(f"device must be cpu or cuda, got {text!r}")
    return text


def _metres(name: str):
    """The parser of a depth-range option: text -> float metres, its error naming `name`."""

    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None

    return parse


@register_teacher(
    "onnx",
    OUTPUT_KIND,
    Option("min_depth", _metres("min_depth"), "metres, overrides the model's metadata"),
    Option("max_depth", _metres("max_depth"), "metres, overrides the model's metadata"),
    Option("device", _parse_device, "cpu or cuda: where ONNX Runtime runs the model (default cpu)"),
    path=True,
)
def build_onnx_teacher(path: Path, *, img_size: Sequence[int], head_kw: dict[str, Any], **options: Any) -> OnnxTeacher:
    """Any input size works (see `OnnxTeacher`): `img_size` is unused."""
    return OnnxTeacher(path, default_range=(head_kw["min_depth"], head_kw["max_depth"]), **options)
