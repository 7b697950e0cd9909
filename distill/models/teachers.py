"""Trainable transformer teachers: timm ViT/Swin backbones and a CNN+ViT hybrid, each with the students' `DepthHead`.

Specs (`build_teacher`):
    timm:<name>          a timm transformer created for `img_size` (e.g. vit_small_patch16_224,
                         swin_tiny_patch4_window7_224). Features: its last 4 stages (hierarchical models), or 4
                         evenly spaced blocks (plain ViTs) reassembled DPT-style to strides p/4, p/2, p, 2p.
    hybrid:<cnn>+<vit>   DPT-hybrid layout (Ranftl et al. 2021): the CNN's 1/16 stage, tokenised by a 1x1 patch
                         embedding, feeds the ViT; features are the CNN's 1/4 and 1/8 stages and two ViT blocks
                         (3/4 depth and last) at 1/16 and 1/32. We compose it rather than use timm's `vit_*_r*`
                         hybrids, whose CNN stages are hidden inside `patch_embed` (ours).
    hf:, onnx:, precomputed:   external teachers, see `distill.models.external`.
All are random-init unless `encoder_weights` names a local timm checkpoint. Input: any size that is a multiple of
`size_divisor`; position embeddings and Swin masks adapt (timm dynamic_img_size).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import UserError
from distill.models.base import DepthModel, DepthOutput
from distill.models.decoder import DepthHead
from distill.models.registry import create_timm_model, timm_normalisation
from distill.registry import Registry

STAGES = 4
HYBRID_CNN_REDUCTIONS = (4, 8, 16)  # CNN stages used: two skips and the one the ViT tokenises


def _resample(in_channels: int, out_channels: int, factor: float) -> nn.Module:
    """1x1 projection then a resize by `factor` (out stride / in stride): transposed conv up, strided conv down."""
    if factor == 1:
        return nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
    project = nn.Conv2d(in_channels, out_channels, 1)
    if factor < 1:
        k = round(1 / factor)
        return nn.Sequential(project, nn.ConvTranspose2d(out_channels, out_channels, k, stride=k))
    return nn.Sequential(project, nn.Conv2d(out_channels, out_channels, 3, stride=round(factor), padding=1))


class Reassemble(nn.ModuleList):
    """DPT reassemble: per-level projection and resize of feature maps to new channels and strides."""

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        out_channels: Sequence[int],
        out_reductions: Sequence[int],
    ) -> None:
        super().__init__(
            _resample(c, oc, o / r) for c, r, oc, o in zip(channels, reductions, out_channels, out_reductions)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(f) for layer, f in zip(self, features)]


def _vit_levels(channels: int, patch: int) -> tuple[list[int], list[int]]:
    """DPT's reassemble targets for a plain ViT of width C and patch p: channels C/8..C, strides p/4, p/2, p, 2p."""
    if patch % 4:
        raise UserError(f"ViT patch size {patch} is not a multiple of 4; cannot reassemble to strides p/4..2p")
    return [channels // 8, channels // 4, channels // 2, channels], [patch // 4, patch // 2, patch, 2 * patch]


def _create_transformer(name: str, weights: str | Path | None, **kwargs: Any) -> nn.Module:
    """A timm transformer sized by `img_size`, without its classifier; UserError if it is not one."""
    try:
        model = create_timm_model(name, weights=weights, num_classes=0, dynamic_img_size=True, **kwargs)
    except TypeError as error:
        raise UserError(f"timm model {name!r} is not a ViT/Swin-style transformer taking img_size ({error})") from None
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise UserError(f"timm model {name!r} has no forward_intermediates; pick a ViT or Swin family model")
    return model


def _evenly_spaced(n: int, k: int) -> list[int]:
    """k indices ending at n - 1, evenly spaced over range(n): (12, 4) -> [2, 5, 8, 11]."""
    return [round((i + 1) * n / k) - 1 for i in range(k)]


class _TeacherBase(DepthModel):
    """Shared by the timm and hybrid teachers: range, head, feature shapes and the `forward(x, names)` signature."""

    output_kind = "metric"

    def _init_head(self, channels: Sequence[int], reductions: Sequence[int], head_kw: dict[str, Any]) -> None:
        self._channels, self._reductions = list(channels), list(reductions)
        self.min_depth, self.max_depth = float(head_kw["min_depth"]), float(head_kw["max_depth"])
        self.size_divisor = max(self._reductions)
        self.head = DepthHead(channels, reductions, **head_kw)

    def feature_channels(self) -> list[int]:
        return list(self._channels)

    def feature_reductions(self) -> list[int]:
        return list(self._reductions)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, names: list[str] | None = None) -> DepthOutput:
        """(B, 3, H, W) normalised -> `DepthOutput` (depth in metres). `names` (frame ids) is unused here."""
        return self.head(self.encode(x), x.shape[-2:])


class TimmTeacher(_TeacherBase):
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
        self.backbone = _create_transformer(name, encoder_weights, img_size=tuple(img_size))
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


class HybridTeacher(_TeacherBase):
    """DPT-hybrid-style teacher: a timm CNN's 1/16 map tokenised into a timm ViT (see module docstring).

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
        self.vit = _create_transformer(vit, None, img_size=grid, patch_size=1, in_chans=cnn_channels[-1])
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


TEACHERS: Registry = Registry("teacher prefix")


@TEACHERS.register("timm")
def _timm_teacher(name: str, *, img_size: Sequence[int], head_kw: dict[str, Any], **kw: Any) -> DepthModel:
    return TimmTeacher(name, img_size=img_size, head_kw=head_kw, **kw)


@TEACHERS.register("hybrid")
def _hybrid_teacher(name: str, *, img_size: Sequence[int], head_kw: dict[str, Any], **kw: Any) -> DepthModel:
    cnn, plus, vit = name.partition("+")
    if not plus or not cnn or not vit:
        raise UserError(
            f"hybrid teacher spec must look like hybrid:<cnn>+<vit> (e.g. resnet50+vit_base_patch16_224), "
            f"got hybrid:{name}"
        )
    return HybridTeacher(cnn, vit, img_size=img_size, head_kw=head_kw, **kw)


def _external_teacher(scheme: str) -> Any:
    def build(name: str, *, img_size: Sequence[int], head_kw: dict[str, Any], **kw: Any) -> DepthModel:
        from distill.models.external import build_external_teacher  # lazy: pulls in transformers/onnxruntime

        return build_external_teacher(
            f"{scheme}:{name}",
            img_size=tuple(img_size),
            min_depth=head_kw["min_depth"],
            max_depth=head_kw["max_depth"],
            **kw,
        )

    return build


for _scheme in ("hf", "onnx", "precomputed"):
    TEACHERS.register(_scheme, _external_teacher(_scheme))


def build_teacher(
    spec: str,
    *,
    img_size: Sequence[int],
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    bins: int = 256,
    decoder_width: int = 128,
    output_stride: int = 4,
    **kw: Any,
) -> DepthModel:
    """The teacher a spec names (see the module docstring), with `.spec` set to the dict that rebuilds it.

    Args:
        spec: "<prefix>:<name>"; prefixes: timm, hybrid, hf, onnx, precomputed.
        img_size: (H, W) pixels the teacher is built for.
        min_depth, max_depth: metres, the depth range (bins range for trainable teachers).
        bins, decoder_width, output_stride: `DepthHead` settings of trainable teachers.
        **kw: passed to the teacher (timm: reassemble, encoder_weights; external: their options).
    """
    prefix, colon, name = spec.partition(":")
    if not colon or not name:
        raise UserError(
            f"teacher spec {spec!r} must look like <prefix>:<name>; prefixes: {', '.join(TEACHERS.names())}"
        )
    head_kw = {
        "width": decoder_width,
        "output_stride": output_stride,
        "bins": bins,
        "min_depth": float(min_depth),
        "max_depth": float(max_depth),
    }
    model = TEACHERS.get(prefix)(name, img_size=img_size, head_kw=head_kw, **kw)
    if getattr(model, "spec", None) is None:
        model.spec = {
            "kind": "teacher",
            "spec": spec,
            "img_size": [int(s) for s in img_size],
            "bins": bins,
            "min_depth": float(min_depth),
            "max_depth": float(max_depth),
            "decoder_width": decoder_width,
            "output_stride": output_stride,
            **{k: v for k, v in kw.items() if k != "encoder_weights"},
        }
    return model
