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
    5. loss = task(Y_s) + task(Y_t) + s·L_kd, L_kd = Σ_l mean((w_l ⊙ (F_s^l − F̃_t^l))²) with F̃_t and the pixel
       weights w_l = A_l / sqrt(mean_p A_l²) detached, and L_kd only once the warm-up (and acclimation) is over.

Stages (steps of train.steps): warm-up [0, W) task losses only, W = round(warmup_fraction · steps); acclimation
[W, W + acclimation_steps) the student is frozen (no update, BN statistics fixed) and only FAM/LAM train through
the ghost: the paper's footnote 1 acclimates the teacher against "a fixed and pretrained student decoder", and the
decoder after the warm-up (or at step 0 when `model.weights` is a converged student and warmup_fraction is 0) is
the most trained one available before KD; distillation from W + acclimation_steps on.

Choices of ours (not the paper's), all in `kd.disdepth`:
    - `ghost_mode: eval` (default): the ghost is a fixed copy of the student's decoder. Its parameters and BN
      running statistics are copied from the student at every step (Algorithm 1, line 4), it runs in eval mode, so
      it normalises the FAM outputs with the *student's* feature statistics and its statistics never move with the
      FAM outputs, and it is in no optimizer. The ghost loss then pins the FAM outputs to the student's feature
      scale. `train` runs its BatchNorm on batch statistics, which ignore the inputs' common scale, so the FAM
      outputs drift (6-14x the student's at the deep stages).
    - `normalize: auto` (default): student and target features are each divided by their RMS over (C, H, W) per
      image before L_kd only when `ghost_mode: train`, the one case whose target scale is free; true/false force it.
    - `scale: auto` (default): the KD factor s is fixed once, at the first distillation step, so that the student's
      gradient of s·L_kd has `kd_fraction` times the norm of its task-loss gradient (SILog + chamfer) on that
      batch; it is frozen afterwards (saved with the method's state). L_kd is a mean over elements, not the
      paper's sum, so the paper's λ = 0.05 has no meaning here; `scale: weight` uses s = `weight` as given.
    - LAM (distill.kd.disdepth_lam): bounded logits with temperature `lam_temperature` (null: the unbounded
      query, which collapses to one pixel); A sums to 1 over the pixels, the LAM output is (H·W·A) ⊙ F̃_t, so
      uniform importance (its start: the query is zero-initialised) leaves the features unchanged. The KD weights
      w = A / sqrt(mean_p A²) have mean(w²) = 1 per image, so the importances only redistribute the loss.
    - The KD target is the FAM output F̃_t (eq. 1 weights the difference by A; the ghost decodes the LAM output).
    - `fam: false` is classic feature KD without acclimation (FitNets): a trainable 1x1 projection of each student
      stage to the teacher's channels, the teacher feature resized to the student's resolution, no ghost head.

Diagnostics: `lam_support()` and `diagnostics()` (ghost advantage = student SILog − ghost SILog at the end of the
warm-up/acclimation and at the last step, the chosen KD scale).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.models.vision_transformer import Block
from torch import nn

from distill.config import Config, Section
from distill.errors import UserError
from distill.kd.disdepth_lam import LAM, attentive_kd_loss, effective_support, kd_weights, rms_normalize
from distill.kd.method import Batch
from distill.kd.registry import kd_section, register_method
from distill.kd.teacher import DistillMethod
from distill.models.base import DepthModel, DepthOutput


class DisDepthSettings(Section):
    """`kd.disdepth`: DisDepth cross-architecture KD (DisDepth §3.3–3.4); see the module docstring."""

    scale: Literal["auto", "weight"] = "auto"
    kd_fraction: Annotated[float, Field(gt=0)] = 0.5
    weight: Annotated[float, Field(ge=0)] = 0.05
    warmup_fraction: float = 0.28
    acclimation_steps: Annotated[int, Field(ge=0)] = 0
    fam: bool = True
    lam: bool = True
    lam_temperature: Annotated[float, Field(gt=0)] | None = 0.5
    ghost_mode: Literal["eval", "train"] = "eval"
    ghost_weight: float = 1.0
    fam_head_dim: int = 32
    lam_dim: int = 64
    normalize: Literal["auto"] | bool = "auto"

    @model_validator(mode="after")
    def _lam_needs_fam(self) -> DisDepthSettings:
        if self.lam and not self.fam:
            raise ValueError("lam: true needs fam: true (the LAM is trained through the ghost decoder)")
        if self.acclimation_steps and not self.fam:
            raise ValueError("acclimation_steps needs fam: true (it trains the FAMs through the ghost decoder)")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        return self

    @property
    def normalizes(self) -> bool:
        """Whether L_kd compares RMS-normalised features (`normalize`, auto: only with a train-mode ghost)."""
        return self.ghost_mode == "train" if self.normalize == "auto" else self.normalize


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


UNMEASURED = -1.0  # KDScale before the first distillation step


class KDScale(nn.Module):
    """The frozen KD factor s ≥ 0 of `scale: auto` as a buffer, so checkpoints and resumes keep it.

    Unmeasured it holds −1, not NaN: the trainer refuses to checkpoint non-finite tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(UNMEASURED))
        self._measured: bool | None = None  # cached, so a set scale costs no device sync per step

    @property
    def measured(self) -> bool:
        if not self._measured:
            self._measured = bool(self.value >= 0)
        return self._measured

    def set(self, value: float) -> None:
        self.value.fill_(value)
        self._measured = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._measured = None


def gradient_norm(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """L2 norm of d loss / d params over all of `params` (float32 scalar; the graph is kept for the real backward)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum(g.float().square().sum() for g in grads if g is not None) + 0.0)


class DisDepthMethod(DistillMethod):
    """Student task loss + ghost-path task loss + s·attentive KD, in stages (see the module docstring).

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
        if settings.lam:
            self.lams = nn.ModuleList(LAM(s, settings.lam_dim, settings.lam_temperature) for s in student_channels)
        self.kd_scale = KDScale()
        # no connector gradient in the warm-up, no student gradient while acclimating
        no_connector_grad = not settings.fam and settings.warmup_fraction > 0
        self.find_unused_parameters = no_connector_grad or settings.acclimation_steps > 0
        self._support: list[torch.Tensor] = []
        self._silog: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def warmup_steps(self) -> int:
        """Optimiser steps of the task-only warm-up: warmup_fraction of the run (needs `total_steps`)."""
        if self.total_steps is None:
            raise RuntimeError("DisDepthMethod.total_steps is unset: the Trainer sets it before training")
        return round(self.settings.warmup_fraction * self.total_steps)

    @property
    def kd_start(self) -> int:
        """First step with the KD term: after the warm-up and the acclimation stage."""
        return self.warmup_steps + self.settings.acclimation_steps

    def acclimating(self, step: int) -> bool:
        """Whether `step` is in the acclimation stage (student frozen, FAM/LAM trained through the ghost)."""
        return self.warmup_steps <= step < self.kd_start

    def trainable_modules(self) -> list[nn.Module]:
        names = ("fams", "lams") if self.settings.fam else ("connectors",)
        return [self.student, *(getattr(self, name) for name in names if hasattr(self, name)), self.kd_scale]

    def train(self, mode: bool = True) -> DisDepthMethod:
        super().train(mode)
        if hasattr(self, "ghost") and self.settings.ghost_mode == "eval":
            self.ghost.eval()
        return self

    def forward(self, batch: Batch, step: int) -> tuple[DepthOutput, dict[str, torch.Tensor]]:
        """As `Method.forward`; while acclimating the student runs without gradients in eval mode (frozen)."""
        if not self.acclimating(step):
            return super().forward(batch, step)
        was_training = self.student.training
        with torch.no_grad():
            out = self.student.eval()(self.student.normalize(batch["image"]))
        self.student.train(was_training)
        return out, self.loss(batch, out, step)

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
        self._support = [effective_support(a).mean() for a in scores]
        return acclimated, list(weighted), list(scores)

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        if step == 0 and self.settings.acclimation_steps and self.kd_start >= self.total_steps:
            raise UserError(
                f"kd.disdepth: the warm-up ({self.warmup_steps} steps) and acclimation_steps "
                f"({self.settings.acclimation_steps}) leave no distillation step of the {self.total_steps}"
            )
        terms = super().loss(batch, out, step)
        teacher = self.teacher_features(batch["image"])
        sizes = [f.shape[-2:] for f in out.features]
        distil = step >= self.kd_start
        if not self.settings.fam:
            if distil:
                student = [c(f) for c, f in zip(self.connectors, out.features)]
                targets = [_resize(t, size) for t, size in zip(teacher, sizes)]
                terms["kd"] = self.kd_term(student, targets, None, terms)
            return terms
        acclimated, weighted, scores = self.acclimate(teacher, sizes)
        sync_ghost(self.ghost, self.student.head)
        ghost_terms = super().loss(batch, self.ghost(weighted, batch["image"].shape[-2:]), step)
        self._record(step, terms["silog"], ghost_terms["silog"])
        if self.acclimating(step):
            terms = {}  # the student is frozen: only the ghost path trains (FAM/LAM)
        terms.update({f"ghost_{name}": self.settings.ghost_weight * value for name, value in ghost_terms.items()})
        if distil:
            task = terms["silog"] + terms.get("chamfer", 0.0)
            terms["kd"] = self.kd_term(out.features, acclimated, scores, {"task": task})
        return terms

    def kd_term(
        self,
        student: Sequence[torch.Tensor],
        target: Sequence[torch.Tensor],
        scores: Sequence[torch.Tensor | None] | None,
        task_terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """s·L_kd of per-level student features and targets, weighted by the LAM scores (None: unweighted).

        `task_terms` (the student's task losses) set s on the first call under `scale: auto`.
        """
        if self.settings.normalizes:
            student, target = [rms_normalize(f) for f in student], [rms_normalize(f.detach()) for f in target]
        weights = [None if a is None else kd_weights(a.detach().float()) for a in scores or [None] * len(student)]
        loss = attentive_kd_loss(student, target, weights)
        if self.settings.scale == "weight":
            return self.settings.weight * loss
        if not self.kd_scale.measured and torch.is_grad_enabled() and loss.requires_grad:
            self._measure_scale(sum(task_terms.values()), loss)
        return self.kd_scale.value.to(loss) * loss

    @torch.no_grad()
    def _measure_scale(self, task: torch.Tensor, kd: torch.Tensor) -> None:
        """s = kd_fraction · |∇task| / |∇L_kd| over the student's parameters (averaged over DDP ranks)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        with torch.enable_grad():
            norms = torch.stack([gradient_norm(task, params), gradient_norm(kd, params)])
        if dist.is_initialized():
            dist.all_reduce(norms)
        task_norm, kd_norm = norms.tolist()
        scale = self.settings.kd_fraction * task_norm / kd_norm if kd_norm > 0 else 0.0
        self.kd_scale.set(scale)

    def _record(self, step: int, student: torch.Tensor, ghost: torch.Tensor) -> None:
        """Keep the SILogs of the last step and of the last step before KD (detached, no device sync)."""
        pair = {"student": student.detach(), "ghost": ghost.detach()}
        self._silog["last"] = pair
        if step == self.kd_start - 1:
            self._silog["warmup_end"] = pair

    def lam_support(self) -> list[float]:
        """Per level (shallow to deep), the batch mean of exp(H(A)) / (H·W) of the last forward; [] without LAM."""
        return [float(s) for s in self._support]

    def diagnostics(self) -> dict[str, Any]:
        """{"ghost_advantage", "student_silog", "ghost_silog": {"warmup_end", "last": float | None},
        "lam_support": [float per level], "kd_scale": float | None (s; None before it is set)}.

        Ghost advantage = student SILog − ghost SILog on the same batch (> 0: the acclimated teacher path decodes
        better than the student), at the last step before KD (warm-up + acclimation) and at the last step taken.
        While acclimating, the student's SILog is that of its frozen eval-mode forward.
        """
        silog = {name: {key: None if key not in self._silog else float(self._silog[key][name])
                        for key in ("warmup_end", "last")} for name in ("student", "ghost")}  # fmt: skip
        advantage = {
            key: None if silog["student"][key] is None else silog["student"][key] - silog["ghost"][key]
            for key in ("warmup_end", "last")
        }
        scale = self.settings.weight if self.settings.scale == "weight" else float(self.kd_scale.value)
        scale = None if scale == UNMEASURED else scale
        return {
            "ghost_advantage": advantage,
            "student_silog": silog["student"],
            "ghost_silog": silog["ghost"],
            "lam_support": self.lam_support(),
            "kd_scale": scale,
        }


@register_method("disdepth", settings=DisDepthSettings, cached_teacher=False)
def build_disdepth(student: DepthModel, teacher: DepthModel, config: Config, settings: Section) -> DisDepthMethod:
    """`kd.method: disdepth`: needs a live teacher with stage features (cached maps carry none)."""
    return DisDepthMethod(student, teacher, config)
