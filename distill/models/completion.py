"""Two-stage depth completion, stage 3: a small RGB-guided network that turns LiDAR-aligned mono
depth plus the sparse LiDAR points into dense metric depth.

Origin: the two-stage pipeline of Gao et al., "Robust Lightweight Depth Estimation Model via Data-Free Distillation"
(its two-stage completion: relative depth -> alignment to sparse depth -> completion guided by RGB and the aligned
depth). The network itself is
ours, sized for the node's CPU budget (0.28 GMAC and 0.14 M parameters at 176x608 with the default widths):

- it predicts a log-residual r on the aligned depth a, so depth = a·exp(r) (clamped to the depth range); the head
  starts at zero, so an untrained network returns the aligned depth unchanged;
- the LiDAR enters as its log-residual e = (ln sparse − ln a) on the points, the correction the network must spread;
- normalised convolution by pooling (Knutsson & Westin, CVPR 1993): at every encoder stride the point-weighted mean
  of e over each cell and the cell's point density join the features, a dense first guess of the correction built
  from average pooling only;
- plain 3x3 conv + BN + ReLU, a U-Net over strides 2-16 with additive skips and bilinear upsampling: no depthwise or
  deformable convolutions, so ONNX Runtime on a CPU and TensorRT run it well. r is predicted at stride 2 and
  upsampled bilinearly: full-resolution convolutions doubled the cost for no gain at the node's resolution;
- with `lidar_gate`, a second head channel gives each LiDAR pixel a learned trust g in (0, 1), and the output there
  is blended in log space towards the measurement, ln d = (1 − g)·ln d̂ + g·ln sparse: a point is kept where it is
  right and overruled where it is not (a Velodyne point seen past a foreground edge from the camera). Most misses
  of the stride-2 residual sit on depth edges, where the points are exact: on the synthetic benchmark (64 beams,
  KITTI protocol) the gate took δ1 from 0.969 to 0.981 at the same cost.

Exported (distill.verbs.export) as a graph taking `image` (B, 3, H, W) normalised RGB, `aligned` (B, 1, H, W) metres,
`sparse` (B, 1, H, W) metres (0 = no point) and `mask` (B, 1, H, W) (1 = point), giving `depth` (B, 1, H, W) metres.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from distill.errors import UserError
from distill.models.base import DepthModel, DepthOutput

KIND = "completion"
DEFAULT_WIDTHS = (12, 24, 48, 64)  # channels at strides 2, 4, 8, 16
DEFAULT_OUTPUT_STRIDE = 2
LOG_REFERENCE = 10.0  # metres; log-depth inputs are ln(d / 10 m), about [-2.3, 2.1] over KITTI's range
INPUT_NAMES = ("image", "aligned", "sparse", "mask")
GUIDE_CHANNELS = 2  # per pooled_guidance level: mean residual, point density


def pooled_guidance(residual: torch.Tensor, mask: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Normalised-convolution pyramid of the LiDAR residual: per level, [mean residual of the cell, point density].

    Args:
        residual: (B, 1, H, W) log-residual on the points, 0 elsewhere.
        mask: (B, 1, H, W) float, 1 where a point is.
        levels: how many levels; level i has stride 2**i (level 0 is the input itself).

    Returns:
        `levels` tensors (B, 2, H / 2**i, W / 2**i): the residual averaged over the points of each cell (0 without
        any) and the fraction of the cell's pixels holding a point.
    """
    total, count = residual * mask, mask
    pyramid = []
    for level in range(levels):
        if level:
            total, count = F.avg_pool2d(total, 2), F.avg_pool2d(count, 2)
        pyramid.append(torch.cat([total / count.clamp_min(1e-6), count], dim=1))
    return pyramid


class DecoderStage(nn.Module):
    """Upsample x2 (bilinear), project to the skip's width (1x1), add the skip, fuse with a 3x3 conv."""

    def __init__(self, in_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.project = ConvNormAct(in_channels, skip_channels, 1)
        self.fuse = ConvNormAct(skip_channels, skip_channels, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(self.project(x) + skip)


class CompletionNet(DepthModel):
    """RGB-guided refinement of LiDAR-aligned depth (see the module docstring).

    A DepthModel for its attributes (mean/std, depth range, size_divisor, `normalize`), but its forward takes three
    inputs besides the image, so image-only code paths (evaluate's predictors, the image-only export) do not apply.

    Args:
        widths: channels at strides s, 2s, 4s, ... with s = output_stride (one value per stride).
        output_stride: 1 or 2, the stride of the stem and of the predicted residual (bilinearly upsampled when 2).
        min_depth, max_depth: metres, the output range.
        lidar_gate: predict a per-point trust and blend the LiDAR points into the output (module docstring). Off
            by default so checkpoints made before it load; `completion.lidar_gate` turns it on for training.
    """

    def __init__(
        self,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        output_stride: int = DEFAULT_OUTPUT_STRIDE,
        min_depth: float = 1e-3,
        max_depth: float = 80.0,
        lidar_gate: bool = False,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise UserError(f"completion widths must be at least 2 positive channel counts, got {widths}")
        if output_stride not in (1, 2):
            raise UserError(f"completion output_stride must be 1 or 2, got {output_stride!r}")
        if not 0 < min_depth < max_depth:
            raise UserError(f"completion depth range needs 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.output_stride, self.lidar_gate = int(output_stride), bool(lidar_gate)
        self.size_divisor = output_stride * 2 ** (len(widths) - 1)
        self.spec = {"kind": KIND, "arch": KIND, "widths": widths, "output_stride": self.output_stride,
                     "min_depth": self.min_depth, "max_depth": self.max_depth,
                     "lidar_gate": self.lidar_gate}  # fmt: skip
        # RGB, ln(aligned) and the level-0 (full-resolution) guidance
        self.stem = ConvNormAct(3 + 1 + GUIDE_CHANNELS, widths[0], 3, stride=output_stride)
        self.down = nn.ModuleList(
            nn.Sequential(ConvNormAct(c_in + GUIDE_CHANNELS, c_out, 3, stride=2), ConvNormAct(c_out, c_out, 3))
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.up = nn.ModuleList(DecoderStage(c_in, c_out) for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]))
        self.head = nn.Conv2d(widths[0], 1 + self.lidar_gate, 3, padding=1)  # log-residual r [, trust logit]
        nn.init.zeros_(self.head.weight)  # r = 0 at the start: the output is the aligned depth (off the points)
        nn.init.zeros_(self.head.bias)

    def forward(  # type: ignore[override]  # the completion inputs come on top of the image
        self, image: torch.Tensor, aligned: torch.Tensor, sparse: torch.Tensor, mask: torch.Tensor
    ) -> DepthOutput:
        """Dense depth.

        Args:
            image: (B, 3, H, W) RGB normalised with `mean`/`std` (see `normalize`).
            aligned: (B, 1, H, W) metres, finite (`depth_node.completion.sanitize_aligned`), clamped to range.
            sparse: (B, 1, H, W) metres, 0 where no point.
            mask: (B, 1, H, W) float, 1 where sparse holds a point, else 0.

        Returns:
            DepthOutput with depth (B, 1, H, W) metres in [min_depth, max_depth] (no bins, no features).
        """
        aligned = aligned.clamp(self.min_depth, self.max_depth)
        log_aligned = torch.log(aligned / LOG_REFERENCE)
        log_sparse = torch.log(sparse.clamp(self.min_depth, self.max_depth) / LOG_REFERENCE)
        residual = (log_sparse - log_aligned) * mask  # 0 off the points (both logs are finite)
        first = self.output_stride.bit_length() - 1  # guidance level of the stem's output stride
        guidance = pooled_guidance(residual, mask, first + len(self.down))
        x = self.stem(torch.cat([image, log_aligned, guidance[0]], dim=1))
        skips = [x]
        for stage, guide in zip(self.down, guidance[first:]):
            x = stage(torch.cat([x, guide], dim=1))
            skips.append(x)
        for stage, skip in zip(self.up, skips[-2::-1]):
            x = stage(x, skip)
        heads = self.head(x)
        if self.output_stride > 1:
            heads = F.interpolate(heads, size=aligned.shape[-2:], mode="bilinear", align_corners=False)
        log_depth = log_aligned + heads[:, :1]
        if self.lidar_gate:
            trust = torch.sigmoid(heads[:, 1:]) * mask
            log_depth = log_depth + trust * (log_sparse - log_depth)
        return DepthOutput(depth=(LOG_REFERENCE * torch.exp(log_depth)).clamp(self.min_depth, self.max_depth))


def build_completion(spec: dict[str, Any]) -> CompletionNet:
    """The network a spec describes: {"kind": "completion", "arch": "completion", "widths", "output_stride",
    "min_depth", "max_depth", "lidar_gate"}
    (missing keys take the defaults; "arch" names the architecture in exported metadata, like a student's)."""
    params = dict(spec)
    if params.pop("kind", KIND) != KIND or params.pop("arch", KIND) != KIND:
        raise UserError(f"not a completion network spec: {spec}")
    try:
        return CompletionNet(**params)
    except TypeError as error:
        raise UserError(f"completion network spec {spec}: {error}") from None
