"""Plumbing shared by the response-based KD methods (TIE-KD, response KD, GT filling, label-free geometric KD).

They all need the same three things from a teacher, which this module provides:
    - `load_teacher`: the frozen teacher that `teacher.spec` / `teacher.weights` name (any kind: trainable timm /
      hybrid checkpoints, `hf:`, `onnx:`, `precomputed:` caches);
    - `DistillMethod.teacher_depth`: its depth for a training batch, at the batch's size, with the training flips
      applied to cached maps, relative outputs least-squares aligned to a reference and clamped to the model's range;
    - `fit_scale_shift`, `top_rows_mask`: the pure maths behind that (per image, masked, differentiable).
Relative teachers (`relative_depth`, `relative_disparity`) are aligned per image with a closed-form least-squares
scale and shift (disparities in inverse-depth space, MiDaS-style) to a reference: the student's detached prediction
(label-free) or the ground truth where the method is told to use it. Metric teachers are used as they are.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distill.config import Config
from distill.errors import UserError
from distill.models.base import DepthModel
from distill.trainer import Batch, SupervisedMethod

RANDOM_INIT_PREFIXES = ("timm:", "hybrid:")  # specs whose models carry no weights of their own
MIN_FIT_PIXELS = 2  # fewer reference pixels than this and the fit is the identity (scale 1, shift 0)


def kd_section(config: Config, name: str):
    """`config.kd.<name>`, the method's typed section; UserError if a YAML set it to null."""
    section = getattr(config.kd, name, None)
    if section is None:
        raise UserError(
            f"kd.{name}: section missing (null) while kd.method={config.kd.method}; see config/default.yaml"
        )
    return section


def load_teacher(config: Config, device: torch.device) -> DepthModel:
    """The frozen teacher (eval mode, no gradients) that the config's `teacher:` section names.

    - `teacher.weights` a checkpoint folder (or run folder) of `distill train`: the model its state.json describes;
      `teacher.spec`, if also set, must agree with it.
    - `teacher.spec` alone: that teacher as built (`hf:`, `onnx:`, `precomputed:` carry their own weights; a
      random-init `timm:` teacher is only useful in tests).
    - `teacher.spec` + a weights file (.safetensors/.pth): the spec built with the default head (256 bins, width
      128, stride 4) over the data's depth range, then the file loaded strictly.
    """
    from distill.checkpoint import STATE_FILE, load_model_from_checkpoint
    from distill.data.kitti import KB_CROP
    from distill.models import build_teacher
    from distill.models.weights import load_weights

    spec, weights = config.teacher.spec, config.teacher.weights
    if spec is None and weights is None:
        raise UserError(f"kd.method={config.kd.method} needs a teacher: set teacher.weights or teacher.spec")
    if weights is not None and (weights.is_dir() or weights.name == STATE_FILE):
        teacher, _ = load_model_from_checkpoint(weights, device)
        saved = teacher.spec.get("spec") or teacher.spec.get("arch")
        if spec is not None and spec != saved:
            raise UserError(f"teacher.spec {spec!r} disagrees with the checkpoint {weights} ({saved!r}); unset one")
    elif spec is None:
        raise UserError(f"teacher.weights {weights} is a weights file: also set teacher.spec (its architecture)")
    else:
        size = config.data.size or KB_CROP  # trainable teachers adapt to any size (dynamic_img_size)
        teacher = build_teacher(spec, img_size=size, min_depth=config.data.min_depth, max_depth=config.data.max_depth)
        if weights is not None:
            load_weights(teacher, weights)
        elif spec.startswith(RANDOM_INIT_PREFIXES):
            tqdm.write(f"teacher: {spec} is random-init (teacher.weights is null); it has nothing to teach")
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def is_precomputed(teacher: DepthModel) -> bool:
    from distill.models.teachers.precomputed import PrecomputedTeacher

    return isinstance(teacher, PrecomputedTeacher)


def check_cached_inputs(config: Config, teacher: DepthModel) -> None:
    """A cached teacher map only matches inputs that are not randomly cropped: refuse `data.crop` with one."""
    if is_precomputed(teacher) and config.data.crop is not None:
        raise UserError(
            f"data.crop={list(config.data.crop)} is a random crop, but teacher.spec={config.teacher.spec} holds "
            "maps of the uncropped frames: set data.crop=null, or use the live teacher (teacher.weights)"
        )


def fit_scale_shift(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image least-squares (s, t) minimising sum over mask of (s * x + t - y)^2, in closed form.

    Same fit as `distill.metrics.align_prediction(..., "lsq")` (numpy, one image), batched and masked in torch. A
    constant x fixes only the shift (s = 0, t = mean y); an image with fewer than 2 masked pixels gets (1, 0).

    Args:
        x: (B, 1, H, W) values to align (any units).
        y: (B, 1, H, W) reference values.
        mask: (B, 1, H, W) bool, pixels that count (x and y finite there).

    Returns:
        scale (B,), shift (B,), in y's units per x unit and y's units.
    """
    w = mask.to(x.dtype).flatten(1)
    x, y = torch.where(mask, x, 0.0).flatten(1), torch.where(mask, y, 0.0).flatten(1)
    count = w.sum(dim=1)
    n = count.clamp_min(1.0)
    x_mean, y_mean = (w * x).sum(1) / n, (w * y).sum(1) / n
    dx, dy = (x - x_mean[:, None]) * w, (y - y_mean[:, None]) * w
    var, cov = (dx * dx).sum(1), (dx * dy).sum(1)
    scale = torch.where(var > 0, cov / var.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(var))
    shift = y_mean - scale * x_mean
    enough = count >= MIN_FIT_PIXELS
    return torch.where(enough, scale, torch.ones_like(scale)), torch.where(enough, shift, torch.zeros_like(shift))


def align_to_reference(
    output: torch.Tensor,
    kind: Literal["metric", "relative_depth", "relative_disparity"],
    reference: torch.Tensor,
    mask: torch.Tensor,
    depth_range: tuple[float, float],
) -> torch.Tensor:
    """A teacher output as depth in the reference's units, clamped to `depth_range`.

    Args:
        output: (B, 1, H, W) teacher output: metres ("metric"), relative depth or relative disparity.
        kind: the teacher's output kind.
        reference: (B, 1, H, W) depth the relative output is fitted to (metres, > 0 where mask).
        mask: (B, 1, H, W) bool, pixels used for the fit.
        depth_range: (min, max) metres of the result.

    Returns:
        (B, 1, H, W) depth. Relative depth: s * output + t fitted to the reference; relative disparity:
        1 / (s * output + t) with s, t fitted to 1 / reference (inverse depth floored at 1 / max).
    """
    low, high = depth_range
    if kind == "relative_depth":
        scale, shift = fit_scale_shift(output, reference, mask)
        output = scale.view(-1, 1, 1, 1) * output + shift.view(-1, 1, 1, 1)
    elif kind == "relative_disparity":
        inverse = 1.0 / reference.clamp_min(low)
        scale, shift = fit_scale_shift(output, inverse, mask)
        output = 1.0 / (scale.view(-1, 1, 1, 1) * output + shift.view(-1, 1, 1, 1)).clamp_min(1.0 / high)
    return output.clamp(low, high)


def top_rows_mask(like: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, 1, H, W) bool, False on the top round(fraction * H) rows (TIE-KD ignores 110 of 352 = 0.3125 on KITTI)."""
    mask = torch.ones_like(like, dtype=torch.bool)
    mask[..., : round(fraction * like.shape[-2]), :] = False
    return mask


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
        from distill.evaluate import predict_depth

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
