"""The depth head shared by students and teachers: a top-down conv + bilinear-upsampling decoder and the bins heads.

Decoder after DenseDepth/AdaBins (DisDepth §3.1): the deepest feature is projected to `width` channels, then for
each shallower feature it is upsampled to that feature's size, concatenated with it and fused by two
conv3x3-BN-LeakyReLU layers. Its output sits at `output_stride` of the input; the bins heads predict there and
the expected depth is bilinearly upsampled to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.base import DepthOutput
from distill.models.bins import BinsHead, expected_depth


def _conv_bn_act(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(),
    )


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UpFuse(nn.Module):
    """Upsample to the skip feature's size, concatenate it, fuse with two conv3x3-BN-LeakyReLU (AdaBins UpSampleBN)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fuse = nn.Sequential(
            _conv_bn_act(in_channels + skip_channels, out_channels), _conv_bn_act(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w), (B, C_skip, H', W') -> (B, C_out, H', W')."""
        return self.fuse(torch.cat([_resize(x, skip.shape[-2:]), skip], dim=1))


class TopDownDecoder(nn.Module):
    """Fuse a feature pyramid deep to shallow into one map of `width` channels at `output_stride`.

    Args:
        in_channels: channels of each feature, shallow to deep.
        reductions: stride of each feature relative to the input, shallow to deep (non-decreasing).
        width: channels of every fused feature. Cost grows with width²; 32-64 suits CPUs.
        output_stride: stride of the output; at most the shallowest feature's. When smaller, one more
            upsample + fuse stage (without a skip) brings the map there, e.g. 2 for features starting at 1/4.
    """

    def __init__(
        self, in_channels: Sequence[int], reductions: Sequence[int], width: int = 128, output_stride: int = 4
    ) -> None:
        super().__init__()
        if len(in_channels) != len(reductions) or not in_channels:
            raise ValueError(f"need one reduction per feature, got {list(in_channels)} and {list(reductions)}")
        if output_stride > reductions[0] or reductions[0] % output_stride:
            raise ValueError(f"output_stride {output_stride} must divide the shallowest reduction {reductions[0]}")
        self.bottleneck = nn.Conv2d(in_channels[-1], width, kernel_size=1)
        self.fuse = nn.ModuleList(UpFuse(width, c, width) for c in reversed(in_channels[:-1]))
        self.upscale = reductions[0] // output_stride
        self.refine = _conv_bn_act(width, width) if self.upscale > 1 else nn.Identity()
        self.out_channels = width

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features shallow to deep, each (B, C_l, H_l, W_l) -> (B, width, H / output_stride, W / output_stride)."""
        x = self.bottleneck(features[-1])
        for fuse, skip in zip(self.fuse, reversed(features[:-1])):
            x = fuse(x, skip)
        if self.upscale > 1:
            x = F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        return self.refine(x)


class DepthHead(nn.Module):
    """Decoder + bins heads: a feature pyramid -> `DepthOutput` at the input size.

    Args:
        in_channels, reductions: of the features, shallow to deep (see `TopDownDecoder`).
        width, output_stride: of the decoder.
        bins, min_depth, max_depth: of the bins heads (K bins tiling [min_depth, max_depth] metres).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        *,
        width: int = 128,
        output_stride: int = 4,
        bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 80.0,
    ) -> None:
        super().__init__()
        self.decoder = TopDownDecoder(in_channels, reductions, width, output_stride)
        self.bins = BinsHead(width, bins, min_depth, max_depth)

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> DepthOutput:
        """Features (shallow to deep) and the input's (H, W) -> depth (B, 1, H, W) metres, probs, centers, features."""
        probs, centers = self.bins(self.decoder(features))
        depth = _resize(expected_depth(probs, centers), size)
        return DepthOutput(depth=depth, probs=probs, centers=centers, features=list(features))
