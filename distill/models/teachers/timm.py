"""`timm:<name>`: a trainable timm transformer (ViT or Swin family) with the students' `DepthHead`.

The backbone is created for `img_size` (e.g. vit_small_patch16_224, swin_tiny_patch4_window7_224) with timm's
dynamic_img_size, so any input that is a multiple of `size_divisor` works. Features: the last 4 stages of
hierarchical models, or 4 evenly spaced blocks of plain ViTs (12 blocks: 3, 6, 9, 12, as DPT-Base) reassembled to
strides p/4, p/2, p, 2p and widths C/8..C, following Ranftl et al., "Vision Transformers for Dense Prediction"
(ICCV 2021), Sec. 3. Random init unless `encoder_weights` names a local timm checkpoint of the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import UserError
from distill.models.teachers._dpt import Reassemble, TrainableTeacher, create_transformer
from distill.models.teachers._scheme import Option, register_teacher
from distill.models.timm_models import timm_normalisation

STAGES = 4


def _vit_levels(channels: int, patch: int) -> tuple[list[int], list[int]]:
    """DPT's reassemble targets for a plain ViT of width C and patch p: channels C/8..C, strides p/4, p/2, p, 2p."""
    if patch % 4:
        raise UserError(f"ViT patch size {patch} is not a multiple of 4; cannot reassemble to strides p/4..2p")
    return [channels // 8, channels // 4, channels // 2, channels], [patch // 4, patch // 2, patch, 2 * patch]


def _evenly_spaced(n: int, k: int) -> list[int]:
    """k indices ending at n - 1, evenly spaced over range(n): (12, 4) -> [2, 5, 8, 11]."""
    return [round((i + 1) * n / k) - 1 for i in range(k)]


class TimmTeacher(TrainableTeacher):
    """A timm transformer backbone + `DepthHead`.

    Args:
        name: timm model name (ViT or Swin family).
        img_size: (H, W) pixels the teacher is built for.
        head_kw: `DepthHead` keywords (width, output_stride, bins, min_depth, max_depth).
        reassemble: reassemble plain-ViT features to 4 strides (DPT); hierarchical models ignore it.
        encoder_weights: optional local timm checkpoint of the backbone.
    """

    def __init__(
        self,
        name: str,
        *,
        img_size: Sequence[int],
        head_kw: dict[str, Any],
        reassemble: bool = True,
        encoder_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_transformer(name, encoder_weights, img_size=tuple(img_size))
        self.mean, self.std = timm_normalisation(self.backbone)
        info = self.backbone.feature_info
        channels, reductions = [f["num_chs"] for f in info], [f["reduction"] for f in info]
        plain = len(set(reductions)) == 1
        self.indices = _evenly_spaced(len(info), STAGES) if plain else list(range(len(info) - STAGES, len(info)))
        self.backbone.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        channels, reductions = [channels[i] for i in self.indices], [reductions[i] for i in self.indices]
        self.neck: nn.Module = nn.Identity()
        if plain and reassemble:
            out_channels, out_reductions = _vit_levels(channels[0], reductions[0])
            self.neck = Reassemble(channels, reductions, out_channels, out_reductions)
            channels, reductions = out_channels, out_reductions
        self._init_head(channels, reductions, head_kw)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True))


def _parse_reassemble(text: str) -> bool:
    """ "true" / "false" in any case (as YAML and Python write them) -> bool."""
    if text.lower() not in ("true", "false"):
        raise ValueError(f"reassemble must be true or false, got {text!r}")
    return text.lower() == "true"


@register_teacher(
    "timm",
    Option("reassemble", _parse_reassemble, "plain ViTs: reassemble features to strides p/4..2p (default true)"),
    Option("encoder_weights", Path, "local timm checkpoint of the backbone (default: random init)"),
)
def build_timm_teacher(name: str, *, img_size: Sequence[int], head_kw: dict[str, Any], **options: Any) -> TimmTeacher:
    return TimmTeacher(name, img_size=img_size, head_kw=head_kw, **options)
