"""GT filling: missing ground-truth pixels take the teacher's prediction, then supervised training on the dense map.

The "filling unknown" experiment of the CNN/Transformer paper (methods.md §6): sparse LiDAR or Kinect holes are
replaced by the frozen teacher's depth and the student is trained with the supervised task loss of `train:` (SILog,
plus the bins chamfer loss) on the result. Labelled pixels keep their ground truth. A relative teacher is first
least-squares aligned to each image's ground truth. Rows above `ignore_top` (fraction of the height) are never filled:
the teacher is least reliable where LiDAR never reaches (KITTI sky), as TIE-KD observes.

Config (`kd.gtfill`): ignore_top.
"""

from __future__ import annotations

import torch

from distill.config import Config
from distill.kd.common import DistillMethod, check_cached_inputs, kd_section, load_teacher, top_rows_mask
from distill.models.base import DepthModel, DepthOutput
from distill.trainer import Batch, Method


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


def build_method(config: Config, student: DepthModel, device: torch.device) -> Method:
    """GT filling for `distill.trainer.build_method` (kd.method: gtfill)."""
    kd_section(config, "gtfill")  # fail before loading the teacher
    teacher = load_teacher(config, device)
    check_cached_inputs(config, teacher)
    return GTFillMethod(student, teacher, config)
