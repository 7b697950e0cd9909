"""What a training run optimises: a `Method` owns the model being trained and its named, weighted loss terms.

A `Method` owns the model being trained (`student`, a student or a teacher) and whatever else a recipe trains or uses
(KD heads, a frozen teacher). Its `forward(batch, step)` returns the model's output and a dict of named,
already-weighted loss terms; the training loop (`distill.training.trainer.Trainer`) minimises their sum. Supervised
training is `SupervisedMethod`; each distillation method is one file of `distill/kd/` registered in
`distill.kd.registry`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from distill.losses import bins_chamfer_loss, silog_loss
from distill.models.base import DepthModel, DepthOutput

Batch = dict[str, Any]


class Method(nn.Module):
    """What a training run optimises. Subclasses implement `loss`; KD methods add modules and a teacher.

    Attributes:
        student: the model being trained and checkpointed (model.safetensors).
        find_unused_parameters: tell DDP that some trainable parameters may get no gradient at some steps
            (e.g. KD heads before the distillation warm-up ends).
        total_steps: optimiser steps of the whole run, set by the Trainer before training (for warm-ups given as
            a fraction of training); None until then.
    """

    find_unused_parameters = False
    total_steps: int | None = None

    def __init__(self, student: DepthModel) -> None:
        super().__init__()
        self.student = student

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimiser updates (the student first); frozen teachers are not listed."""
        return [self.student]

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        """Named scalar loss terms, each already weighted; the optimised loss is their sum.

        Args:
            batch: collated samples on the device (image (B, 3, H, W) in [0, 1], depth/valid (B, 1, H, W), K, meta).
            out: the student's output on batch["image"].
            step: 0-based index of the optimiser step being taken (for warm-ups).
        """
        raise NotImplementedError

    def forward(self, batch: Batch, step: int) -> tuple[DepthOutput, dict[str, torch.Tensor]]:
        """The student's output and the loss terms (one call, so DDP sees every trainable parameter used)."""
        out = self.student(self.student.normalize(batch["image"]))
        return out, self.loss(batch, out, step)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """State of the trainable modules besides the student, saved in method.safetensors."""
        tensors = {}
        for name, module in self._extra_children():
            tensors.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
        return tensors

    def load_extra_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `extra_tensors` (strict per module)."""
        for name, module in self._extra_children():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def _extra_children(self) -> Iterator[tuple[str, nn.Module]]:
        trainable = self.trainable_modules()
        for name, module in self.named_children():
            if module is not self.student and any(module is t for t in trainable):
                yield name, module


class SupervisedMethod(Method):
    """Task loss only (DisDepth §3.1): SILog on valid ground truth + weighted bins chamfer when the model has bins."""

    def __init__(self, student: DepthModel, alpha: float, lam: float, chamfer_weight: float) -> None:
        super().__init__(student)
        self.alpha, self.lam, self.chamfer_weight = alpha, lam, chamfer_weight

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        terms = {"silog": silog_loss(out.depth.float(), batch["depth"], batch["valid"], self.alpha, self.lam)}
        if self.chamfer_weight > 0 and out.centers is not None:
            chamfer = bins_chamfer_loss(out.centers.float(), batch["depth"], batch["valid"])
            terms["chamfer"] = self.chamfer_weight * chamfer
        return terms
