"""The one interface every student and teacher implements, so training, KD, eval and export never branch on kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

OutputKind = Literal["metric", "relative_depth", "relative_disparity"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DepthOutput:
    """What a depth model's forward returns.

    Attributes:
        depth: (B, 1, H, W) at the input resolution. Metres when the model's `output_kind` is "metric",
            otherwise relative depth or relative disparity (unitless).
        probs: (B, K, h, w) per-pixel bin probabilities (softmax over K), or None for models without bins.
        centers: (B, K) bin centres in metres, or None.
        features: decoder-input features for feature KD: students give their encoder's last 4 stages,
            teachers their last 4 stages; each (B, C_l, H_l, W_l). Empty for black-box teachers.
    """

    depth: torch.Tensor
    probs: torch.Tensor | None = None
    centers: torch.Tensor | None = None
    features: list[torch.Tensor] = field(default_factory=list)


class DepthModel(nn.Module):
    """Base class: forward takes a normalised image batch and returns a `DepthOutput`.

    Input: (B, 3, H, W) float32, RGB, already normalised as (image01 - mean) / std with this model's `mean`/`std`
    (use `normalize`). H and W must be multiples of `size_divisor`.
    """

    output_kind: OutputKind = "metric"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = 32
    min_depth: float = 1e-3
    max_depth: float = 80.0

    def normalize(self, image01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the normalised input this model expects."""
        mean = torch.tensor(self.mean, dtype=image01.dtype, device=image01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=image01.dtype, device=image01.device).view(1, 3, 1, 1)
        return (image01 - mean) / std

    def feature_channels(self) -> list[int]:
        """Channels of `DepthOutput.features`, shallow to deep (empty for black-box models)."""
        return []

    def feature_reductions(self) -> list[int]:
        """Stride of each entry of `DepthOutput.features` relative to the input (empty for black-box models)."""
        return []
