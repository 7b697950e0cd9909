"""Response-based KD baselines: the student's depth regressed onto the teacher's (methods.md §6, TIE-KD Table I).

    ssim      1 - SSIM(d_s, d_t)                  (`distill.losses.ssim_loss`, depth / model.max_depth)
    mse       mean (d_s - d_t)^2                  (square metres)
    si        Eigen's scale-invariant error        (`distill.losses.scale_invariant_loss`, lambda = 0.5)
    ssim_si   (1 - SSIM) + SI                      (unit weights, as the TIE-KD code's SSIM_SI_loss)
    ssim_mse  (1 - SSIM) + MSE
Optionally plus the supervised task loss on the ground truth (SILog + bins chamfer of `train:`) times `gt_weight`
(the "fine-tuned with teacher" setting of the CNN/Transformer paper). Like TIE-KD the terms can ignore the top rows.

Config (`kd.response`): loss, gt_weight, ignore_top (fraction of rows), align_to (student | gt: reference of
relative teachers' least-squares alignment).
"""

from __future__ import annotations

import torch

from distill.config import Config
from distill.kd.common import DistillMethod, check_cached_inputs, kd_section, load_teacher, top_rows_mask
from distill.losses import mse_loss, scale_invariant_loss, ssim_loss
from distill.models.base import DepthModel, DepthOutput
from distill.trainer import Batch, Method

LOSSES = ("ssim", "mse", "si", "ssim_si", "ssim_mse")


def response_loss(
    kind: str, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, max_depth: float
) -> torch.Tensor:
    """One of the response losses above between student and teacher depth.

    Args:
        kind: "ssim", "mse", "si", "ssim_si" or "ssim_mse".
        pred: (B, 1, H, W) student depth, metres.
        target: (B, 1, H, W) teacher depth, metres.
        valid: (B, 1, H, W) bool pixels that count, or None (all).
        max_depth: metres, SSIM normalisation.

    Returns:
        Scalar loss (0 for pred == target).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown response loss {kind!r}: expected one of {', '.join(LOSSES)}")
    parts = kind.split("_")
    total = ssim_loss(pred, target, valid, max_depth=max_depth) if "ssim" in parts else 0.0
    if "mse" in parts:
        total = total + mse_loss(pred, target, valid)
    if "si" in parts:
        total = total + scale_invariant_loss(pred, target, valid)
    return total


class ResponseMethod(DistillMethod):
    """Student depth vs teacher depth with one response loss, plus gt_weight x the supervised task loss."""

    def __init__(self, student: DepthModel, teacher: DepthModel, config: Config) -> None:
        super().__init__(student, teacher, config)
        self.cfg = kd_section(config, "response")
        self.max_depth = float(config.model.max_depth)

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.align_to == "gt":
            teacher, valid = self.teacher_depth(batch, batch["depth"], batch["valid"])
        else:
            teacher, valid = self.teacher_depth(batch, out.depth.detach())
        valid &= top_rows_mask(valid, cfg.ignore_top)
        terms = {f"response_{cfg.loss}": response_loss(cfg.loss, out.depth.float(), teacher, valid, self.max_depth)}
        if cfg.gt_weight > 0:
            terms.update(
                {f"gt_{name}": cfg.gt_weight * value for name, value in super().loss(batch, out, step).items()}
            )
        return terms


def build_method(config: Config, student: DepthModel, device: torch.device) -> Method:
    """Response KD for `distill.trainer.build_method` (kd.method: response)."""
    kd_section(config, "response")  # fail before loading the teacher
    teacher = load_teacher(config, device)
    check_cached_inputs(config, teacher)
    return ResponseMethod(student, teacher, config)
