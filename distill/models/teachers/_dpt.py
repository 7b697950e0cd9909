"""What the trainable teachers (timm, hybrid) share: timm transformer creation, DPT's reassemble and the base class.

Reassemble follows Ranftl et al., "Vision Transformers for Dense Prediction" (DPT, ICCV 2021), Sec. 3
("Convolutional decoder"): each encoder level is projected to new channels by a 1x1 convolution and resampled to
its target stride (transposed convolution up, strided 3x3 convolution down).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import UserError
from distill.models.base import DepthModel, DepthOutput
from distill.models.decoder import DepthHead
from distill.models.timm_models import create_timm_model


def _resample(in_channels: int, out_channels: int, factor: float) -> nn.Module:
    """1x1 projection then a resize by `factor` (out stride / in stride): transposed conv up, strided conv down."""
    if factor == 1:
        return nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
    project = nn.Conv2d(in_channels, out_channels, 1)
    if factor < 1:
        k = round(1 / factor)
        return nn.Sequential(project, nn.ConvTranspose2d(out_channels, out_channels, k, stride=k))
    return nn.Sequential(project, nn.Conv2d(out_channels, out_channels, 3, stride=round(factor), padding=1))


class Reassemble(nn.ModuleList):
    """DPT reassemble: per-level projection and resize of feature maps to new channels and strides."""

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        out_channels: Sequence[int],
        out_reductions: Sequence[int],
    ) -> None:
        super().__init__(
            _resample(c, oc, o / r) for c, r, oc, o in zip(channels, reductions, out_channels, out_reductions)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(f) for layer, f in zip(self, features)]


def create_transformer(name: str, weights: str | Path | None, **kwargs: Any) -> nn.Module:
    """A timm transformer sized by `img_size`, without its classifier; UserError if it is not one."""
    try:
        model = create_timm_model(name, weights=weights, num_classes=0, dynamic_img_size=True, **kwargs)
    except TypeError as error:
        raise UserError(f"timm model {name!r} is not a ViT/Swin-style transformer taking img_size ({error})") from None
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise UserError(f"timm model {name!r} has no forward_intermediates; pick a ViT or Swin family model")
    return model


class TrainableTeacher(DepthModel):
    """Shared by the timm and hybrid teachers: range, head, feature shapes and the `forward(x, names)` signature."""

    output_kind = "metric"

    def _init_head(self, channels: Sequence[int], reductions: Sequence[int], head_kw: dict[str, Any]) -> None:
        self._channels, self._reductions = list(channels), list(reductions)
        self.min_depth, self.max_depth = float(head_kw["min_depth"]), float(head_kw["max_depth"])
        self.size_divisor = max(self._reductions)
        self.head = DepthHead(channels, reductions, **head_kw)

    def feature_channels(self) -> list[int]:
        return list(self._channels)

    def feature_reductions(self) -> list[int]:
        return list(self._reductions)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised -> the 4 feature maps the head reads, (B, C_l, H / r_l, W / r_l)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, names: list[str] | None = None) -> DepthOutput:
        """(B, 3, H, W) normalised -> `DepthOutput` (depth in metres). `names` (frame ids) is unused here."""
        return self.head(self.encode(x), x.shape[-2:])
