"""The export's parity checks: graph inputs (smooth random images, calibration images, a completion network's depth
inputs), the worst relative error of ONNX Runtime against PyTorch on them, and the depth error of an FP16/INT8
model against its FP32 model."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from depth_node.engine import plan_input, preprocess
from distill.errors import UserError

PARITY_TOLERANCE = 1e-3
# Median relative depth error of a reduced-precision model against its FP32 model. FP16 rounds at ~1e-3 per op;
# INT8 quantization costs a few per cent at most on a well-calibrated model, more means bad calibration data.
PRECISION_TOLERANCE = {"fp16": 0.01, "int8": 0.05}
PARITY_SAMPLES = 3
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def extra_inputs(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's required forward arguments after the image (e.g. a completion network's
    aligned/sparse/mask); optional ones keep their defaults in the graph."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return tuple(p.name for p in parameters if p.default is inspect.Parameter.empty and p.kind in _POSITIONAL)


def parity_inputs(model: nn.Module, size: tuple[int, int], calib: Path | None) -> list[dict[str, np.ndarray]]:
    """PARITY_SAMPLES graph feeds: "image" (1, 3, H, W) normalised, from calibration images if given, else smooth
    noise; plus, for models with more inputs, (1, 1, H, W) depth-like maps (see `depth_inputs`)."""
    extra = extra_inputs(model)
    return [
        {"image": image, **(depth_inputs(model, size, seed) if extra else {})}
        for seed, image in enumerate(image_feeds(model.mean, model.std, size, calib))
    ]


def image_feeds(mean, std, size: tuple[int, int], calib: Path | None) -> list[np.ndarray]:
    """PARITY_SAMPLES (1, 3, H, W) normalised images at size (H, W): the first calibration images if `calib` is
    given, else smooth noise; preprocessed as the node does."""
    if calib is not None:
        from distill.verbs.calibration import calibration_images

        images = [image for image, _ in zip(calibration_images(calib), range(PARITY_SAMPLES))]
    else:
        images = [smooth_random_image(size, seed) for seed in range(PARITY_SAMPLES)]
    return [preprocess(image, plan_input(image.shape[:2], size, "stretch"), mean, std) for image in images]


def depth_inputs(model: nn.Module, size: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """A completion network's other inputs: "aligned" smooth depth in the model's range, "sparse" 5 % of it with
    noise (0 elsewhere) and its "mask"; each (1, 1, H, W) float32."""
    names = extra_inputs(model)
    if names != ("aligned", "sparse", "mask"):
        raise UserError(f"cannot export a model whose forward takes {('image', *names)}: only image-only models and "
                        "completion networks (image, aligned, sparse, mask) are supported")  # fmt: skip
    rng = np.random.default_rng(seed)
    low, high = float(model.min_depth), float(model.max_depth)
    smooth = smooth_random_image(size, seed + 100)[..., 0].astype(np.float32) / 255.0
    aligned = (low + (0.05 + 0.9 * smooth) * (high - low))[None, None]
    mask = (rng.random(aligned.shape) < 0.05).astype(np.float32)
    sparse = aligned * (1 + 0.1 * rng.standard_normal(aligned.shape).astype(np.float32)) * mask
    return {"aligned": aligned, "sparse": np.clip(sparse, 0, high).astype(np.float32), "mask": mask}


def smooth_random_image(size: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W, 3) uint8: low-frequency colour noise over a vertical gradient, closer to a photo than white noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    coarse = rng.uniform(0, 255, (max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = 0.7 * image + 0.3 * np.linspace(220, 40, height, dtype=np.float32)[:, None, None]
    return np.clip(image, 0, 255).astype(np.uint8)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / |expected|, the denominator floored at 0.1 % of max |expected| (near-zero values)."""
    expected = np.asarray(expected, np.float64)
    floor = max(1e-3 * float(np.abs(expected).max(initial=0.0)), 1e-12)
    return float((np.abs(np.asarray(actual, np.float64) - expected) / np.maximum(np.abs(expected), floor)).max())


def check_parity(wrapper: nn.Module, path: Path, samples: list[dict[str, np.ndarray]]) -> float:
    """Worst relative error of ONNX Runtime (CPU) against PyTorch over all outputs and samples."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for sample in samples:
        with torch.no_grad():
            expected = wrapper(*(torch.from_numpy(value) for value in sample.values()))
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = session.run(None, sample)
        for got, want in zip(actual, expected):
            worst = max(worst, relative_error(got, want.numpy()))
    return worst


@dataclass(frozen=True)
class DepthError:
    """Depth of a reduced-precision model against its FP32 model over every pixel of the parity samples."""

    median_abs_m: float  # median |depth - depth_fp32|, metres (model units for relative models)
    median_rel: float  # median |depth - depth_fp32| / depth_fp32
    p95_rel: float  # 95th percentile of the same
    samples: int

    def __str__(self) -> str:
        return (f"median |Δdepth| {self.median_abs_m:.4f} m, median relative {self.median_rel:.2%} "
                f"(p95 {self.p95_rel:.2%}) on {self.samples} images")  # fmt: skip


def compare_precision(reference: Path, candidate: Path, images: list[np.ndarray]) -> DepthError:
    """The `depth` output of `candidate` against `reference` (both ONNX, ONNX Runtime CPU) on (1, 3, H, W) images."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (reference, candidate)]
    absolute, relative = [], []
    for image in images:
        want, got = (np.asarray(session.run(["depth"], {"image": image})[0], np.float64) for session in sessions)
        floor = max(1e-3 * float(np.abs(want).max(initial=0.0)), 1e-12)
        absolute.append(np.abs(got - want).ravel())
        relative.append((np.abs(got - want) / np.maximum(np.abs(want), floor)).ravel())
    absolute, relative = np.concatenate(absolute), np.concatenate(relative)
    return DepthError(
        float(np.median(absolute)), float(np.median(relative)), float(np.percentile(relative, 95)), len(images)
    )
