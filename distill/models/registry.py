"""Names to builders: one small `Registry` (duplicates raise, unknown names suggest close matches) and timm creation.

`create_timm_model` is the one place models come from timm: never from a hub, optionally from a local weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generic, TypeVar

import timm
from torch import nn

from distill.errors import UserError, did_you_mean
from distill.models.base import IMAGENET_MEAN, IMAGENET_STD

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders (or any objects) of one kind.

    Example:
        STUDENTS = Registry("student arch")
        @STUDENTS.register("resnet18")
        def resnet18(**kw): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Add `obj` under `name`, or return a decorator adding the decorated object. A taken name raises."""
        if obj is None:
            return lambda decorated: self.register(name, decorated)
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered under `name`; an unknown name raises UserError with close matches and the list."""
        if name not in self._items:
            raise UserError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)} (known: {', '.join(self.names())})"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


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
