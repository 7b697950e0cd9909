"""The frozen teacher of a distillation run: loading it, checking cached maps fit the inputs, and its depth for a
training batch (at the batch's size, with the training flips applied to cached maps, relative outputs aligned to a
reference by `distill.kd.alignment` and clamped to the model's range). Shared by every method that has a teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distill.checkpoint import STATE_FILE
from distill.config import Config
from distill.errors import UserError
from distill.inference import predict_depth
from distill.kd.alignment import align_to_reference
from distill.kd.method import Batch, SupervisedMethod
from distill.models import load_model
from distill.models.base import DepthModel
from distill.models.teachers.precomputed import PrecomputedTeacher

RANDOM_INIT_PREFIXES = ("timm:", "hybrid:")  # specs whose models carry no weights of their own


def load_teacher(config: Config, device: torch.device) -> DepthModel:
    """The frozen teacher (eval mode, no gradients) that the config's `teacher:` section names.

    - `teacher.weights` a checkpoint folder (or run folder) of `distill train`: the model its state.json describes;
      `teacher.spec`, if also set, must agree with it.
    - `teacher.spec` alone: that teacher as built (`hf:`, `onnx:`, `precomputed:` carry their own weights; a
      random-init `timm:` teacher is only useful in tests).
    - `teacher.spec` + a weights file (.safetensors/.pth): the spec built with the default head (256 bins, width
      128, stride 4) over the data's depth range, then the file loaded strictly.
    """
    spec, weights = config.teacher.spec, config.teacher.weights
    if spec is None and weights is None:
        raise UserError(f"kd.method={config.kd.method} needs a teacher: set teacher.weights or teacher.spec")
    if weights is not None and (weights.is_dir() or weights.name == STATE_FILE):
        teacher, _ = load_model(weights, device=device)
        saved = teacher.spec.get("spec") or teacher.spec.get("arch")
        if spec is not None and spec != saved:
            raise UserError(f"teacher.spec {spec!r} disagrees with the checkpoint {weights} ({saved!r}); unset one")
    elif spec is None:
        raise UserError(f"teacher.weights {weights} is a weights file: also set teacher.spec (its architecture)")
    else:  # trainable teachers adapt to any size (dynamic_img_size)
        data = config.data
        teacher, _ = load_model(spec, weights=weights, img_size=data.size, min_depth=data.min_depth,
                                max_depth=data.max_depth)  # fmt: skip
        if weights is None and spec.startswith(RANDOM_INIT_PREFIXES):
            tqdm.write(f"teacher: {spec} is random-init (teacher.weights is null); it has nothing to teach")
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def is_precomputed(teacher: DepthModel) -> bool:
    return isinstance(teacher, PrecomputedTeacher)


def check_cached_inputs(config: Config, teacher: DepthModel) -> None:
    """A cached teacher map only matches inputs that are not randomly cropped: refuse `data.crop` with one."""
    if is_precomputed(teacher) and config.data.crop is not None:
        raise UserError(
            f"data.crop={list(config.data.crop)} is a random crop, but teacher.spec={config.teacher.spec} holds "
            "maps of the uncropped frames: set data.crop=null, or use the live teacher (teacher.weights)"
        )


class DistillMethod(SupervisedMethod):
    """A student trained against a frozen teacher's depth; `SupervisedMethod.loss` stays available for GT terms.

    The teacher is a child module (moved with `.to(device)`), never in `trainable_modules()` (so neither optimised
    nor checkpointed) and kept in eval mode by `train()`, so its BatchNorm statistics never change.

    Args:
        student: the model being trained.
        teacher: from `load_teacher` (frozen).
        config: the run config (train: SILog/chamfer settings for GT terms; model: depth range of the student).
    """

    def __init__(self, student: DepthModel, teacher: DepthModel, config: Config) -> None:
        train = config.train
        super().__init__(student, train.silog_alpha, train.silog_lambda, train.chamfer_weight)
        self.teacher = teacher
        self.depth_range = (float(config.model.min_depth), float(config.model.max_depth))

    def train(self, mode: bool = True) -> DistillMethod:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_output(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's raw output on the batch: ((B, 1, H, W) float32, (B, 1, H, W) bool usable pixels).

        Cached maps of horizontally flipped samples (meta "hflip", set by the training transform) are flipped too.
        """
        image = batch["image"]
        if is_precomputed(self.teacher):
            output = self.teacher(image, names=list(batch["meta"]["name"])).depth.float()
            output = torch.where(_flip_flags(batch).view(-1, 1, 1, 1), output.flip(-1), output)
        else:
            output = predict_depth(self.teacher, image)
        if output.shape[-2:] != image.shape[-2:]:
            output = F.interpolate(output, size=image.shape[-2:], mode="bilinear", align_corners=False)
        usable = torch.isfinite(output)
        if self.teacher.output_kind != "relative_disparity":
            usable &= output > 0  # 0 marks holes in cached maps; a disparity of 0 is a point at infinity
        return torch.where(usable, output, 0.0), usable

    @torch.no_grad()
    def teacher_depth(
        self, batch: Batch, reference: torch.Tensor, reference_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher depth in metres (relative outputs aligned to `reference`) and its (B, 1, H, W) bool validity.

        Args:
            batch: the training batch.
            reference: (B, 1, H, W) metres, the student's prediction or the ground truth; used by relative teachers.
            reference_valid: (B, 1, H, W) bool pixels of the reference to fit on (None: all of them).
        """
        output, usable = self.teacher_output(batch)
        fit_on = usable & (reference > 0)
        if reference_valid is not None:
            fit_on &= reference_valid
        depth = align_to_reference(output, self.teacher.output_kind, reference.float(), fit_on, self.depth_range)
        return depth, usable


def _flip_flags(batch: Batch) -> torch.Tensor:
    """(B,) bool: which samples the training transform mirrored (collated meta "hflip")."""
    flags = batch["meta"].get("hflip")
    if flags is None:
        raise UserError(
            "a precomputed teacher needs to know which training samples were flipped, but the batch meta has no "
            "'hflip' flag (distill.data.transforms must record it); use the live teacher (teacher.weights) meanwhile"
        )
    return torch.as_tensor(flags, dtype=torch.bool, device=batch["image"].device).view(-1)
