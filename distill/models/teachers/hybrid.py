"""`hybrid:<cnn>+<vit>`: a trainable CNN+ViT teacher in the DPT-hybrid layout, with the students' `DepthHead`.

Layout of DPT-Hybrid in Ranftl et al., "Vision Transformers for Dense Prediction" (ICCV 2021), Sec. 3: the CNN's
1/16 stage, tokenised by a 1x1 patch embedding, feeds the ViT; features are the CNN's 1/4 and 1/8 stages and two
ViT blocks (3/4 depth and last) at 1/16 and 1/32. We compose it from two timm models rather than use timm's
`vit_*_r*` hybrids, whose CNN stages are hidden inside `patch_embed`. Random init unless `encoder_weights` names a
local timm checkpoint of the CNN.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill.errors import UserError
from distill.models.teachers._dpt import Reassemble, TrainableTeacher, create_transformer
from distill.models.teachers._scheme import Option, register_teacher
from distill.models.timm_models import create_timm_model, timm_normalisation

HYBRID_CNN_REDUCTIONS = (4, 8, 16)  # CNN stages used: two skips and the one the ViT tokenises


class HybridTeacher(TrainableTeacher):
    """DPT-hybrid-style teacher: a timm CNN's 1/16 map tokenised into a timm ViT (see the module docstring).

    Args:
        cnn, vit: timm names, e.g. "resnet50" and "vit_base_patch16_224".
        img_size: (H, W) pixels the teacher is built for.
        head_kw: `DepthHead` keywords.
        encoder_weights: optional local timm checkpoint of the CNN (the ViT stays random: its patch embedding
            takes CNN features, so image-pretrained ViT weights do not fit).
    """

    def __init__(
        self,
        cnn: str,
        vit: str,
        *,
        img_size: Sequence[int],
        head_kw: dict[str, Any],
        encoder_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        with torch.device("meta"):  # read the stage strides without building weights twice
            all_reductions = create_timm_model(cnn, features_only=True).feature_info.reduction()
        missing = [r for r in HYBRID_CNN_REDUCTIONS if r not in all_reductions]
        if missing:
            raise UserError(f"hybrid CNN {cnn!r} has no stage at stride {missing} (its strides: {all_reductions})")
        stages = tuple(all_reductions.index(r) for r in HYBRID_CNN_REDUCTIONS)
        self.cnn = create_timm_model(cnn, weights=encoder_weights, features_only=True, out_indices=stages)
        self.mean, self.std = timm_normalisation(self.cnn)
        cnn_channels = self.cnn.feature_info.channels()
        stride = HYBRID_CNN_REDUCTIONS[-1]
        grid = (img_size[0] // stride, img_size[1] // stride)
        self.vit = create_transformer(vit, None, img_size=grid, patch_size=1, in_chans=cnn_channels[-1])
        blocks = len(self.vit.feature_info)
        self.indices = [round(0.75 * blocks) - 1, blocks - 1]
        self.vit.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        width = self.vit.feature_info[0]["num_chs"]
        channels = [*cnn_channels[:2], width, width]
        reductions = [*HYBRID_CNN_REDUCTIONS[:2], stride, stride]
        out_reductions = [*HYBRID_CNN_REDUCTIONS[:2], stride, 2 * stride]
        self.neck = Reassemble(channels, reductions, channels, out_reductions)
        self._init_head(channels, out_reductions, head_kw)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        f4, f8, f16 = self.cnn(x)
        tokens = self.vit.forward_intermediates(f16, indices=self.indices, intermediates_only=True)
        return self.neck([f4, f8, *tokens])


@register_teacher(
    "hybrid",
    Option("encoder_weights", Path, "local timm checkpoint of the CNN (default: random init; the ViT stays random)"),
)
def build_hybrid_teacher(
    name: str, *, img_size: Sequence[int], head_kw: dict[str, Any], **options: Any
) -> HybridTeacher:
    cnn, plus, vit = name.partition("+")
    if not plus or not cnn or not vit:
        raise UserError(
            f"hybrid teacher spec must look like hybrid:<cnn>+<vit> (e.g. resnet50+vit_base_patch16_224), "
            f"got hybrid:{name}"
        )
    return HybridTeacher(cnn, vit, img_size=img_size, head_kw=head_kw, **options)
