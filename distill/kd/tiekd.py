"""TIE-KD: teacher-independent KD through Depth Probability Maps ("TIE-KD: Teacher-Independent and Explainable Knowledge
Distillation for Monocular Depth Estimation", §3.2–3.3).

Only the teacher's output depth is used, so any teacher works (trainable checkpoints, `hf:`, black-box `onnx:`,
cached `precomputed:` maps). Per pixel, the teacher's depth d becomes a Depth Probability Map over fixed uniform bins:
the Gaussian density N(c_k; d, sigma) at the bin centres c_k, values under 1e-16 replaced by -1000 (cut-off), softmax
over the bins (as the official code HPC-Lab-KOREATECH/TIE-KD, `L_DPM_loss`). The student's loss is

    weight * (alpha * mean_cells KL(DPM_t || DPM_s) + (1 - alpha) * (1 - SSIM(d_s, d_t)))    (paper: 10, 0.1)

with no ground truth. Both terms ignore the top rows (`ignore_top`, a fraction of the image height: the paper drops
the top 110 of the 352 KITTI rows, 0.3125, and the fraction scales the same band to other heights).

Official KITTI layout (the default): 257 bins, linearly spaced ("we uniformly divide the depth range into bins",
§3.2) over [1e-3, 80] m, i.e. 258 edges 1e-3 + k·(80 − 1e-3)/257; sigma 0.5 m (the official code's effective value;
the paper says 0.8); ignore_top 110/352. NYU: 49 bins over [1e-3, 10] m (`kd.tiekd.bins=49`, `model.max_depth=10`).

Our choices:
- The student's DPM is its own bin-probability head: its AdaBins widths head is pinned to uniform bins (last layer
  zeroed and the MLP frozen, so ReLU(0) + 0.1 gives K equal widths) instead of adding a second head. The bins are
  then the model's, over [`model.min_depth`, `model.max_depth`], and depth = sum_k p_k c_k is exactly the
  student's output, so the distilled head is the one that is exported. `kd.tiekd.bins` sets K: a fresh student's
  bins heads are rebuilt with K bins (its spec records K); null keeps `model.bins`.
- The student predicts its DPM at its output stride s (1/4 of the input): the teacher DPM of a cell is the mean of
  the DPMs of its s x s teacher pixels (a mixture, whose expected depth is the cell's mean teacher depth), not the
  DPM of one resized depth, so depth edges stay bimodal.
- SSIM is `distill.losses.ssim_loss` on depth / model.max_depth with masked windows.

Config (`kd.tiekd`): bins, sigma (m), alpha, weight, ignore_top (fraction of rows), align_to (student | gt:
reference of relative teachers' least-squares alignment).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distill.config import Config, Section
from distill.errors import UserError
from distill.kd.alignment import top_rows_mask
from distill.kd.method import Batch, Method
from distill.kd.registry import kd_section, register_method
from distill.kd.teacher import DistillMethod
from distill.losses import ssim_loss
from distill.models.base import DepthModel, DepthOutput
from distill.models.bins import BinsHead

CUTOFF_DENSITY = 1e-16  # Gaussian densities below this are cut off before the softmax (official code)
CUTOFF_LOGIT = -1000.0  # what they become: exp(-1000) is exactly 0 in float32
LOG_EPS = 1e-12  # student probabilities are floored here inside the log
OFFICIAL_KITTI_BINS = 257  # official KITTI recipe: 257 uniform bins (258 edges) over [1e-3, 80] m
OFFICIAL_KITTI_IGNORED_ROWS, OFFICIAL_KITTI_ROWS = 110, 352  # top rows of the KB crop both terms ignore


class TIEKDSettings(Section):
    """`kd.tiekd`: TIE-KD through Depth Probability Maps (TIE-KD §3.2–3.3)."""

    bins: Annotated[int, Field(ge=2)] | None = OFFICIAL_KITTI_BINS
    sigma: Annotated[float, Field(gt=0)] = 0.5
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.1
    weight: Annotated[float, Field(ge=0)] = 10.0
    ignore_top: Annotated[float, Field(ge=0, lt=1)] = OFFICIAL_KITTI_IGNORED_ROWS / OFFICIAL_KITTI_ROWS
    align_to: Literal["student", "gt"] = "student"


def gaussian_dpm(depth: torch.Tensor, centers: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depth Probability Map of a depth map.

    Args:
        depth: (B, 1, h, w) metres.
        centers: (B, K) or (K,) bin centres, metres.
        sigma: metres, standard deviation of the Gaussian.

    Returns:
        (B, K, h, w) probabilities summing to 1 over K: softmax over bins of the density N(c_k; d, sigma),
        densities < 1e-16 set to -1000 first.
    """
    centers = centers.view(-1, centers.shape[-1], 1, 1)
    density = torch.exp(-((centers - depth) ** 2) / (2 * sigma**2)) / math.sqrt(2 * math.pi * sigma**2)
    return torch.softmax(torch.where(density < CUTOFF_DENSITY, CUTOFF_LOGIT, density), dim=1)


def teacher_dpm(
    depth: torch.Tensor, valid: torch.Tensor, centers: torch.Tensor, sigma: float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's DPM at the student's probability resolution: each cell's mean DPM over its valid pixels.

    Args:
        depth: (B, 1, H, W) teacher depth, metres.
        valid: (B, 1, H, W) bool, usable teacher pixels.
        centers: (B, K) bin centres, metres.
        sigma: metres.
        size: (h, w) of the student's DPM; H / h and W / w are the integer stride s (1 = same size).

    Returns:
        DPM (B, K, h, w) (sums to 1 in valid cells) and (B, 1, h, w) bool, cells with a valid pixel.
    """
    h, w = size
    stride = max(round(depth.shape[-2] / h), 1)
    if depth.shape[-2:] != (h * stride, w * stride):
        depth = F.interpolate(depth, size=(h * stride, w * stride), mode="nearest")
        valid = F.interpolate(valid.float(), size=(h * stride, w * stride), mode="nearest") > 0
    depths = F.pixel_unshuffle(depth, stride)  # (B, s*s, h, w): one channel per pixel of each cell
    weights = F.pixel_unshuffle(valid.to(depth.dtype), stride)
    total = torch.zeros(depth.shape[0], centers.shape[-1], h, w, dtype=depth.dtype, device=depth.device)
    for j in range(stride * stride):  # one (B, K, h, w) DPM at a time keeps memory at a single DPM
        total += weights[:, j : j + 1] * gaussian_dpm(depths[:, j : j + 1], centers, sigma)
    count = weights.sum(dim=1, keepdim=True)
    return total / count.clamp_min(1.0), count > 0


def dpm_kl(target: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked cells of KL(target || probs) = sum_k t_k (ln t_k - ln p_k).

    Args:
        target: (B, K, h, w) teacher DPM.
        probs: (B, K, h, w) student DPM (floored at 1e-12 inside the log).
        mask: (B, 1, h, w) bool, cells that count.

    Returns:
        Scalar, nats (0 when no cell counts, graph kept).
    """
    kl = (torch.xlogy(target, target) - target * torch.log(probs.clamp_min(LOG_EPS))).sum(dim=1, keepdim=True)
    return kl[mask].mean() if mask.any() else probs.sum() * 0.0


def tiekd_terms(
    out: DepthOutput,
    teacher: torch.Tensor,
    teacher_valid: torch.Tensor,
    *,
    sigma: float,
    alpha: float,
    weight: float,
    ignore_top: float,
    max_depth: float,
) -> dict[str, torch.Tensor]:
    """The two weighted TIE-KD terms for a student output and teacher depth.

    Args:
        out: student output with probs (B, K, h, w), centers (B, K) and depth (B, 1, H, W), metres.
        teacher: (B, 1, H, W) teacher depth, metres.
        teacher_valid: (B, 1, H, W) bool, usable teacher pixels.
        sigma, alpha, weight, ignore_top: see the module docstring.
        max_depth: metres, SSIM normalisation.

    Returns:
        {"tiekd_dpm": weight * alpha * KL, "tiekd_ssim": weight * (1 - alpha) * (1 - SSIM)}.
    """
    probs, centers = out.probs.float(), out.centers.float()
    pixels = teacher_valid & top_rows_mask(teacher_valid, ignore_top)  # ignored pixels feed neither term
    target, cells = teacher_dpm(teacher, pixels, centers, sigma, tuple(probs.shape[-2:]))
    kl = dpm_kl(target, probs, cells)
    structure = ssim_loss(out.depth, teacher, pixels, max_depth=max_depth)
    return {"tiekd_dpm": weight * alpha * kl, "tiekd_ssim": weight * (1 - alpha) * structure}


def pin_uniform_bins(model: DepthModel, bins: int | None = None, pretrained: bool = False) -> None:
    """Make a bins-head model's bins fixed and uniform: zero and freeze its widths MLP (ReLU(0) + 0.1 everywhere).

    Args:
        model: a model with AdaBins-style bins heads (`model.head.bins`).
        bins: K the bins heads must have; a head with another K is rebuilt fresh (its spec records K). None: keep.
        pretrained: the model carries trained weights (`model.weights`), so rebuilding its head is refused.
    """
    head = getattr(getattr(model, "head", None), "bins", None)
    if not isinstance(head, BinsHead):
        raise UserError(f"kd.method=tiekd needs a model with AdaBins-style bins heads, got {type(model).__name__}")
    if bins is not None and head.logits.out_channels != bins:
        if pretrained:
            raise UserError(
                f"kd.tiekd.bins={bins} but model.weights has {head.logits.out_channels} bins: set "
                f"kd.tiekd.bins={head.logits.out_channels} (or null) to distil on the model's bins"
            )
        hidden, device = head.widths[0].out_features, head.logits.weight.device
        head = model.head.bins = BinsHead(head.logits.in_channels, bins, head.min_depth, head.max_depth, hidden)
        head.to(device)
        model.spec["bins"] = bins
    last = head.widths[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    head.widths.requires_grad_(False)


class TIEKDMethod(DistillMethod):
    """TIE-KD on a student whose bins are pinned uniform (see the module docstring); no ground truth is used."""

    def __init__(self, student: DepthModel, teacher: DepthModel, config: Config) -> None:
        super().__init__(student, teacher, config)
        self.cfg = kd_section(config, "tiekd")
        self.max_depth = float(config.model.max_depth)

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        if self.cfg.align_to == "gt":
            teacher, valid = self.teacher_depth(batch, batch["depth"], batch["valid"])
        else:
            teacher, valid = self.teacher_depth(batch, out.depth.detach())
        cfg = self.cfg
        return tiekd_terms(
            out, teacher, valid, sigma=cfg.sigma, alpha=cfg.alpha, weight=cfg.weight, ignore_top=cfg.ignore_top,
            max_depth=self.max_depth,
        )  # fmt: skip


@register_method("tiekd", settings=TIEKDSettings)
def build_tiekd(student: DepthModel, teacher: DepthModel, config: Config, settings: Section) -> Method:
    """`kd.method: tiekd`: the student's bins are set to `kd.tiekd.bins` and pinned uniform (the DPMs live on them)."""
    pin_uniform_bins(student, settings.bins, pretrained=config.model.weights is not None)
    return TIEKDMethod(student, teacher, config)
