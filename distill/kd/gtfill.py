"""GT filling: missing ground-truth pixels take the teacher's prediction, then supervised training on the dense map.

The "filling unknown" experiment of "Monocular Depth Estimation Methods using CNN and Transformer" (§3.2, §4.3): sparse
LiDAR or Kinect holes are replaced by the frozen teacher's depth and the student is trained with the supervised task
loss of `train:` (SILog, plus the bins chamfer loss) on the result. Labelled pixels keep their ground truth. A relative
teacher is first
least-squares aligned to each image's ground truth. Rows above `ignore_top` (fraction of the height) are never filled:
the teacher is least reliable where LiDAR never reaches (KITTI sky), as TIE-KD observes.

Config (`kd.gtfill`): ignore_top.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from distill.config import Config, Section
from distill.kd.alignment import top_rows_mask
from distill.kd.method import Batch, Method
from distill.kd.registry import kd_section, register_method
from distill.kd.teacher import DistillMethod
from distill.models.base import DepthModel, DepthOutput


class GTFillSettings(Section):
    """`kd.gtfill`: ground truth densified by the teacher's depth ("Monocular Depth Estimation Methods using CNN and
    Transformer", §4.3)."""

    ignore_top: Annotated[float, Field(ge=0, lt=1)] = 0.0


def fill_gt(
    gt: torch.Tensor, valid: torch.Tensor, teacher: torch.Tensor, teacher_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth with its invalid pixels replaced by the teacher's depth.

    Args:
        gt: (B, 1, H, W) metres, 0 where invalid.
        valid: (B, 1, H, W) bool, labelled pixels.
        teacher: (B, 1, H, W) teacher depth, metres.
        teacher_valid: (B, 1, H, W) bool, pixels where the teacher may fill.

    Returns:
        depth (B, 1, H, W) metres (gt where valid, else teacher where teacher_valid, else 0) and its validity.
    """
    filled = torch.where(valid, gt, torch.where(teacher_valid, teacher, torch.zeros_like(gt)))
    return filled, valid | teacher_valid


class GTFillMethod(DistillMethod):
    """The supervised loss on ground truth densified by the teacher."""

    def __init__(self, student: DepthModel, teacher: DepthModel, config: Config) -> None:
        super().__init__(student, teacher, config)
        self.cfg = kd_section(config, "gtfill")

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        teacher, usable = self.teacher_depth(batch, batch["depth"], batch["valid"])
        usable &= top_rows_mask(usable, self.cfg.ignore_top)
        depth, valid = fill_gt(batch["depth"], batch["valid"], teacher, usable)
        terms = super().loss(dict(batch, depth=depth, valid=valid), out, step)
        return {f"filled_{name}": value for name, value in terms.items()}


@register_method("gtfill", settings=GTFillSettings)
def build_gtfill(student: DepthModel, teacher: DepthModel, config: Config, settings: Section) -> Method:
    """`kd.method: gtfill`."""
    return GTFillMethod(student, teacher, config)
