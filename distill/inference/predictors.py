"""Predictors: a torch model or an exported model behind one interface, for batches and for single RGB frames."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError
from distill.inference.predict import predict_depth
from distill.models import load_model
from distill.models.base import DepthModel

EXPORTED_SUFFIXES = (".onnx", ".engine", ".plan", ".trt")


@dataclass
class Predictor:
    """A depth model behind one call.

    Attributes:
        name: what it is, for tables (file or folder name).
        output_kind: "metric", "relative_depth" or "relative_disparity".
        batch: (B, 3, H, W) RGB in [0, 1] on `device` -> (B, 1, H, W) float32 depth at the same resolution.
        device: where `batch` wants its images.
        rgb: optional direct path for one (H, W, 3) uint8 RGB frame -> (H, W) float32 depth; by default `batch`.
    """

    name: str
    output_kind: str
    batch: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device = torch.device("cpu")
    rgb: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        return self.batch(images01)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 depth (metres if metric)."""
        if self.rgb is not None:
            return self.rgb(rgb)
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255).to(self.device)
        return self.batch(image)[0, 0].cpu().numpy()


def model_predictor(model: DepthModel, size: tuple[int, int] | None = None, name: str = "") -> Predictor:
    """`Predictor` of a torch depth model, run at `size` (see `predict_depth`)."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    batch = lambda images: predict_depth(model, images, size)  # noqa: E731
    return Predictor(name or type(model).__name__, model.output_kind, batch, device)


def engine_predictor(path: Path, backend: str = "auto") -> Predictor:
    """`Predictor` of an exported model run by the depth_node engine (ONNX Runtime or TensorRT)."""
    from depth_node.engine import ModelLoadError, open_engine

    try:
        engine = open_engine(path, backend=backend)
    except ModelLoadError as error:
        raise UserError(str(error)) from None

    def batch(images: torch.Tensor) -> torch.Tensor:
        rgb = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([torch.from_numpy(engine.infer(np.ascontiguousarray(x)).depth)[None] for x in rgb])

    return Predictor(path.name, engine.metadata.output_kind, batch, rgb=lambda rgb: engine.infer(rgb).depth)


def open_predictor(ref: str | Path, device: torch.device | str | None = None, backend: str = "auto") -> Predictor:
    """A predictor for an exported model file or anything `load_model` accepts (checkpoint or run folder, ...).

    A trained checkpoint runs at its training size (its config's data.size) when it has one.

    Args:
        ref: .onnx / .engine file, checkpoint folder, run folder.
        device: torch device for checkpoints (default: CUDA when available).
        backend: depth_node engine backend for exported files.
    """
    path = Path(ref)
    if path.suffix.lower() in EXPORTED_SUFFIXES and not path.is_dir():
        if not path.is_file():
            raise UserError(f"model not found: {path}")
        return engine_predictor(path, backend)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_model(path, device=device)
    size = (config.get("data") or {}).get("size")
    return model_predictor(model, tuple(size) if size else None, name=path.name)
