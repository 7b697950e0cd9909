"""Names to objects: one small `Registry` (duplicates raise, unknown names suggest close matches).

A helper below every layer, so datasets, models and methods each keep a registry of their own kinds.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from distill.errors import UserError, did_you_mean

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
