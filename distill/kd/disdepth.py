"""DisDepth cross-architecture KD (DisDepth: "Promoting CNNs with Cross-Architecture Knowledge Distillation for
Efficient Monocular Depth Estimation", §3.3–3.4, Algorithm 1): a transformer teacher's features, acclimated to the
student's decoder, distilled into a CNN student with a loss-attention weighting.

Per training step (Algorithm 1):
    1. the ghost head (a copy of the student's decoder and bins heads) is re-copied from the student;
    2. the frozen teacher backbone gives its last 4 stage features F_t (no grad, eval mode);
    3. F̃_t = FAM(F_t): one transformer block per stage, a 1x1 projection to the student's channels and a resize
       to the student's stage resolution; then LAM(F̃_t) = (H·W·A) ⊙ F̃_t with A the LAM's pixel importances;
    4. the ghost head decodes LAM(F̃_t) into Y_t; SILog(Y_t) trains FAM and LAM only (the ghost is never optimised,
       gradients just flow through it);
    5. loss = task(Y_s) + task(Y_t) + λ·L_kd, L_kd = Σ_l mean((w_l ⊙ (F_s^l − F̃_t^l))²) with F̃_t and the pixel
       weights w_l = A_l / sqrt(mean_p A_l²) detached, and L_kd only once the warm-up is over.

Choices of ours (not the paper's), all in `kd.disdepth`:
    - L_kd is normalised per element (a mean over B·C·H·W per level, summed over levels), so its size does not
      depend on the image size and λ = 0.05 keeps its meaning across sizes.
    - The LAM scores A sum to 1 over the pixels of each image. The LAM output is (H·W·A) ⊙ F̃_t, so uniform
      importance (which the LAM starts from: its query is zero-initialised) leaves the features unchanged. The KD
      weights w = A / sqrt(mean_p A²) have mean(w²) = 1 per image: the importances only redistribute the loss over
      the pixels, uniform A gives the plain per-element MSE of the FAM ablation, and a peaked A cannot inflate
      L_kd (with w = H·W·A a single-pixel peak would scale it by H·W).
    - The KD target is the FAM output F̃_t (eq. 1 weights the difference by A; the ghost head decodes the
      LAM-weighted features).
    - `normalize` (default on): student and target features are each divided by their RMS over (C, H, W) per image
      before L_kd. The decoder fuses its inputs through BatchNorm, which ignores their common scale, so the ghost
      loss leaves the FAM outputs' scale free (it drifts to 10-25x the student's at the deep stages); unnormalised,
      L_kd would mostly ask the student to grow its features.
    - `fam: false` is classic feature KD without acclimation (FitNets): a trainable 1x1 projection of each student
      stage to the teacher's channels, the teacher feature resized to the student's resolution, no ghost head.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import model_validator
from timm.models.vision_transformer import Block
from torch import nn

from distill.config import Config, Section
from distill.errors import UserError
from distill.kd.method import Batch
from distill.kd.registry import kd_section, register_method
from distill.kd.teacher import DistillMethod
from distill.models.base import DepthModel, DepthOutput


class DisDepthSettings(Section):
    """`kd.disdepth`: DisDepth cross-architecture KD (DisDepth §3.3–3.4)."""

    weight: float = 0.05
    warmup_fraction: float = 0.28
    fam: bool = True
    lam: bool = True
    ghost_weight: float = 1.0
    fam_head_dim: int = 32
    lam_dim: int = 64
    normalize: bool = True

    @model_validator(mode="after")
    def _lam_needs_fam(self) -> DisDepthSettings:
        if self.lam and not self.fam:
            raise ValueError("lam: true needs fam: true (the LAM is trained through the ghost decoder)")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        return self


def attentive_kd_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """L_kd = Σ_l mean((w_l ⊙ (F_s^l − F_t^l))²) over the B·C·H·W elements of each level (DisDepth eq. 1).

    Args:
        student: per level (B, C_l, H_l, W_l) student features.
        teacher: per level targets of the same shapes; treated as constants (detached here).
        weights: per level (B, 1, H_l, W_l) pixel weights (detached here), or None for weight 1 (plain MSE).

    Returns:
        Scalar float32 loss; 0 when every weight is 0.
    """
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t, w in zip(student, teacher, weights, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ")
        diff = s.float() - t.detach().float()
        if w is not None:
            diff = diff * w.detach().float()
        total = total + diff.square().mean()
    return total


class FAM(nn.Module):
    """Feature acclimation module: a transformer block on one teacher stage, projected and resized to the student's.

    Args:
        teacher_channels: C_t of the teacher stage.
        student_channels: C_s of the matching student stage.
        head_dim: channels per attention head (heads = the largest divisor of C_t not above C_t / head_dim).
    """

    def __init__(self, teacher_channels: int, student_channels: int, head_dim: int) -> None:
        super().__init__()
        heads = max(1, teacher_channels // head_dim)
        while teacher_channels % heads:
            heads -= 1
        # LN -> MHSA -> residual, LN -> MLP x4 GELU -> residual (timm's ViT block, fused attention).
        self.block = Block(teacher_channels, heads, mlp_ratio=4.0, qkv_bias=True)
        self.project = nn.Conv2d(teacher_channels, student_channels, kernel_size=1)

    def forward(self, feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(B, C_t, h, w) teacher feature -> (B, C_s, *size) acclimated feature."""
        batch, channels, height, width = feature.shape
        tokens = self.block(feature.flatten(2).transpose(1, 2))
        feature = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return _resize(self.project(feature), size)


class LAM(nn.Module):
    """Loss attention module: cross-attention from the feature's spatial mean (query) to its pixels (keys).

    Args:
        channels: C of the input feature.
        dim: width of the query/key projections.
    """

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(channels, dim)
        self.key = nn.Conv2d(channels, dim, kernel_size=1)
        nn.init.zeros_(self.query.weight)  # uniform scores at the start: the LAM begins as the identity
        nn.init.zeros_(self.query.bias)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> ((H·W·A) ⊙ feature, A (B, 1, H, W) importances summing to 1 over the H·W pixels)."""
        batch, _, height, width = feature.shape
        query = self.query(feature.mean(dim=(2, 3)))  # (B, d)
        keys = self.key(feature).flatten(2)  # (B, d, H·W)
        logits = torch.einsum("bd,bdn->bn", query, keys) / math.sqrt(query.shape[1])
        scores = torch.softmax(logits.float(), dim=1).to(feature.dtype).view(batch, 1, height, width)
        return feature * (scores * height * width), scores


def rms_normalize(feature: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, C, H, W) feature divided by its root mean square over (C, H, W), per image."""
    return feature / (feature.float().square().mean(dim=(1, 2, 3), keepdim=True) + eps).sqrt().to(feature.dtype)


def kd_weights(scores: torch.Tensor) -> torch.Tensor:
    """Pixel weights of the attentive KD from LAM scores: A / sqrt(mean_p A²), so that mean_p(w²) = 1 per image.

    Args:
        scores: (B, 1, H, W) importances A, non-negative, not all zero per image (a softmax over the pixels).

    Returns:
        (B, 1, H, W) weights; all ones for uniform scores.
    """
    return scores / scores.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()


def make_ghost(head: nn.Module) -> nn.Module:
    """A frozen copy of the student's decoder + heads (requires_grad False: never in an optimizer)."""
    ghost = copy.deepcopy(head)
    ghost.requires_grad_(False)
    return ghost


@torch.no_grad()
def sync_ghost(ghost: nn.Module, head: nn.Module) -> None:
    """Copy the student's current parameters and buffers (BN statistics) into the ghost, in place."""
    ghost_tensors = itertools.chain(ghost.parameters(), ghost.buffers())
    for target, source in zip(ghost_tensors, itertools.chain(head.parameters(), head.buffers()), strict=True):
        target.copy_(source)


def _resize(feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    return F.interpolate(feature, size=tuple(size), mode="bilinear", align_corners=False)


class DisDepthMethod(DistillMethod):
    """Student task loss + ghost-path task loss + λ·attentive KD (see the module docstring).

    Args:
        student: the student; its `head` (decoder + bins heads) is what the ghost copies.
        teacher: trained teacher exposing 4 stage features (timm:/hybrid:); frozen here.
        config: the run config (`kd.disdepth`, and train: for the task losses).
    """

    def __init__(self, student: DepthModel, teacher: DepthModel, config: Config) -> None:
        super().__init__(student, teacher.eval().requires_grad_(False), config)
        self.settings = settings = kd_section(config, "disdepth")
        student_channels, teacher_channels = student.feature_channels(), teacher.feature_channels()
        if len(teacher_channels) != len(student_channels):
            raise UserError(
                f"teacher: kd.method=disdepth needs a teacher with {len(student_channels)} stage features "
                f"(timm:/hybrid: teachers), this one has {len(teacher_channels)}"
            )
        if not hasattr(student, "head"):
            raise UserError("model: kd.method=disdepth needs a student with a decoder head (model.kind=student)")
        pairs = list(zip(teacher_channels, student_channels))
        if settings.fam:
            self.fams = nn.ModuleList(FAM(t, s, settings.fam_head_dim) for t, s in pairs)
            self.ghost = make_ghost(student.head)
        else:  # classic feature KD: student stages projected to the teacher's channels
            self.connectors = nn.ModuleList(nn.Conv2d(s, t, kernel_size=1) for t, s in pairs)
            self.find_unused_parameters = settings.warmup_fraction > 0  # no connector gradient in the warm-up
        if settings.lam:
            self.lams = nn.ModuleList(LAM(s, settings.lam_dim) for s in student_channels)

    @property
    def warmup_steps(self) -> int:
        """Optimiser steps before the KD term starts: warmup_fraction of the run (needs `total_steps`)."""
        if self.total_steps is None:
            raise RuntimeError("DisDepthMethod.total_steps is unset: the Trainer sets it before training")
        return round(self.settings.warmup_fraction * self.total_steps)

    def trainable_modules(self) -> list[nn.Module]:
        names = ("fams", "lams") if self.settings.fam else ("connectors",)
        return [self.student, *(getattr(self, name) for name in names if hasattr(self, name))]

    def teacher_features(self, image01: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's stage features of a (B, 3, H, W) [0, 1] batch, shallow to deep."""
        with torch.no_grad():
            return self.teacher(self.teacher.normalize(image01)).features

    def acclimate(
        self, teacher: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
        """FAM then LAM per stage -> (FAM outputs, LAM outputs for the ghost, LAM scores or None per stage)."""
        acclimated = [fam(f, size) for fam, f, size in zip(self.fams, teacher, sizes)]
        if not self.settings.lam:
            return acclimated, acclimated, [None] * len(acclimated)
        weighted, scores = zip(*(lam(f) for lam, f in zip(self.lams, acclimated)))
        return acclimated, list(weighted), list(scores)

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        terms = super().loss(batch, out, step)
        teacher = self.teacher_features(batch["image"])
        sizes = [f.shape[-2:] for f in out.features]
        distil = step >= self.warmup_steps
        if not self.settings.fam:
            if distil:
                student = [c(f) for c, f in zip(self.connectors, out.features)]
                terms["kd"] = self.kd_term(student, [_resize(t, size) for t, size in zip(teacher, sizes)], None)
            return terms
        acclimated, weighted, scores = self.acclimate(teacher, sizes)
        sync_ghost(self.ghost, self.student.head)
        ghost_terms = super().loss(batch, self.ghost(weighted, batch["image"].shape[-2:]), step)
        terms.update({f"ghost_{name}": self.settings.ghost_weight * value for name, value in ghost_terms.items()})
        if distil:
            terms["kd"] = self.kd_term(out.features, acclimated, scores)
        return terms

    def kd_term(
        self, student: Sequence[torch.Tensor], target: Sequence[torch.Tensor], scores: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """λ·L_kd of per-level student features and targets, weighted by the LAM scores (None: unweighted)."""
        if self.settings.normalize:
            student, target = [rms_normalize(f) for f in student], [rms_normalize(f.detach()) for f in target]
        weights = [None if a is None else kd_weights(a.detach().float()) for a in scores or [None] * len(student)]
        return self.settings.weight * attentive_kd_loss(student, target, weights)


@register_method("disdepth", settings=DisDepthSettings, cached_teacher=False)
def build_disdepth(student: DepthModel, teacher: DepthModel, config: Config, settings: Section) -> DisDepthMethod:
    """`kd.method: disdepth`: needs a live teacher with stage features (cached maps carry none)."""
    return DisDepthMethod(student, teacher, config)
