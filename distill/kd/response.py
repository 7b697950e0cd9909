"""Response-based KD baselines: the student's depth regressed onto the teacher's (the response-based KD of TIE-KD §4.3,
Table I).

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

from typing import Annotated, Literal

import torch
from pydantic import Field

from distill.config import Config, Section
from distill.kd.alignment import top_rows_mask
from distill.kd.method import Batch, Method
from distill.kd.registry import kd_section, register_method
from distill.kd.teacher import DistillMethod
from distill.losses import mse_loss, scale_invariant_loss, ssim_loss
from distill.models.base import DepthModel, DepthOutput

LOSSES = ("ssim", "mse", "si", "ssim_si", "ssim_mse")


class ResponseSettings(Section):
    """`kd.response`: response-KD baselines (TIE-KD §4.3, Table I)."""

    loss: Literal["ssim", "mse", "si", "ssim_si", "ssim_mse"] = "ssim"
    gt_weight: Annotated[float, Field(ge=0)] = 0.0
    ignore_top: Annotated[float, Field(ge=0, lt=1)] = 0.0
    align_to: Literal["student", "gt"] = "student"


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


@register_method("response", settings=ResponseSettings)
def build_response(student: DepthModel, teacher: DepthModel, config: Config, settings: Section) -> Method:
    """`kd.method: response`."""
    return ResponseMethod(student, teacher, config)
