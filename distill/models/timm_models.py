"""Models from timm: `create_timm_model` is the one place they come from (never from a hub, optionally from a
local weights file), and `timm_normalisation` the input statistics their weights expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from distill.errors import UserError, did_you_mean
from distill.models.base import IMAGENET_MEAN, IMAGENET_STD


def create_timm_model(name: str, *, weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **kwargs)`, random init unless `weights` names a local timm checkpoint.

    Weights load through timm's own loader (pretrained_cfg file), so classifier heads are dropped, position
    embeddings are resized to `img_size` and `features_only` wrapping happens after loading. Nothing is downloaded.

    Raises:
        UserError: unknown timm name (with close matches), a weights file that does not exist, or one timm cannot
            load (wrong architecture, corrupt, or an unsafe pickle).
    """
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}")
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"encoder weights file does not exist: {path}")
    try:  # timm loads with weights_only=True: a pickle with code in it fails here instead of running
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise UserError(f"cannot load {name} weights from {path}: {str(error).splitlines()[0]}") from None


def timm_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of RGB in [0, 1] that a timm model's weights expect (ViT augreg: 0.5; most CNNs: ImageNet)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
