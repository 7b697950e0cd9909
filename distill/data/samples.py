"""The sample every dataset returns, and the file readers the loaders share (failing with a `UserError`).

A sample is a dict:
    image: (3, H, W) float32 RGB in [0, 1]
    depth: (1, H, W) float32 metres, 0 = invalid (no label)
    valid: (1, H, W) bool, depth > 0 and finite
    K:     (3, 3) float32 pinhole intrinsics of the returned image, pixels
    meta:  dict of str -> str/int/float (at least "name": a unique frame id)
Unlabeled samples (rosbags) have depth all 0 and valid all False; with a LiDAR they add
    sparse_depth: (1, H, W) float32 metres of the projected scan, 0 = no point.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from distill.errors import UserError

if TYPE_CHECKING:
    import torch


def read_rgb(path: Path) -> np.ndarray:
    """Read a colour image file (PNG, JPEG). Returns (H, W, 3) uint8 RGB; grey images are replicated to 3 channels."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot read image {path}: file missing, unreadable or corrupt")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_depth_png(path: Path, metres_per_unit: float) -> np.ndarray:
    """Read a 16-bit depth PNG (KITTI: 1/256 m per unit, NYU: 1/1000 m). Returns (H, W) float32 metres, 0 = invalid."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise UserError(f"cannot read depth PNG {path}: file missing, unreadable or corrupt")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise UserError(f"depth PNG {path} must be 16-bit single-channel, got {raw.dtype} with shape {raw.shape}")
    return raw.astype(np.float32) * np.float32(metres_per_unit)


def make_sample(
    image: np.ndarray,
    depth: np.ndarray | None,
    K: np.ndarray,
    meta: dict[str, Any],
    depth_range: tuple[float, float],
    sparse_depth: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the sample dict of the contract above from numpy arrays.

    Args:
        image: (H, W, 3) uint8 RGB.
        depth: (H, W) float32 metres, 0 or non-finite = invalid; None for unlabeled frames.
        K: (3, 3) intrinsics in pixels.
        meta: frame metadata, must hold "name".
        depth_range: (min, max) metres; depth (and sparse depth) outside the open interval becomes invalid.
        sparse_depth: optional (H, W) float32 metres of a projected LiDAR scan, 0 = no point.
    """
    import torch

    height, width = image.shape[:2]
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
        "depth": _depth_tensor(depth, depth_range, height, width),
        "K": torch.as_tensor(np.asarray(K, dtype=np.float32)).clone(),
        "meta": dict(meta),
    }
    sample["valid"] = sample["depth"] > 0
    if sparse_depth is not None:
        sample["sparse_depth"] = _depth_tensor(sparse_depth, depth_range, height, width)
    return sample


def _depth_tensor(depth: np.ndarray | None, depth_range: tuple[float, float], height: int, width: int) -> torch.Tensor:
    """(H, W) metres -> (1, H, W) float32 tensor with everything outside depth_range (or non-finite) set to 0."""
    import torch

    if depth is None:
        return torch.zeros(1, height, width)
    depth = np.asarray(depth, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(depth) & (depth > depth_range[0]) & (depth < depth_range[1])
    return torch.from_numpy(np.where(keep, depth, np.float32(0.0))[None].astype(np.float32))
