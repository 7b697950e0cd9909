"""What the teachers run or read as they are (hf, onnx, precomputed) share: sizing inputs and reading side files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.errors import UserError


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), bilinear; a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def nearest_multiple(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The (H, W) nearest to (height, width) whose sides are positive multiples of `multiple` pixels."""
    return max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple)


def read_json(path: Path) -> dict:
    """A JSON side file (preprocessor_config.json, teacher.json); unreadable or invalid JSON raises UserError."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read JSON ({error})") from None
