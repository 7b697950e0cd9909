"""The distillation methods by name: each method file registers its builder and its settings schema here.

Adding a method `foo` is one file, `distill/kd/foo.py`:

    class FooSettings(Section):          # its `kd.foo:` keys, typed, with their defaults
        weight: float = 1.0

    @register_method("foo", settings=FooSettings)
    def build_foo(student, teacher, config, settings) -> Method: ...

`kd.method: foo` then selects it; `config/default.yaml` documents its keys (a `kd.foo:` block there must repeat the
schema's defaults). Every module of this package is imported on first use, so nothing else needs to list it. The
shared build steps run here, once, for every method: the settings are validated (`kd.<name>.<key>` errors with a
close match), the frozen teacher is loaded (`distill.kd.teacher.load_teacher`) and, for methods that accept cached
teacher maps, checked against the inputs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from pydantic import BaseModel

from distill.config import Config, Section, require_paths, validate_section
from distill.errors import UserError, did_you_mean
from distill.kd.method import Method, SupervisedMethod
from distill.kd.teacher import check_cached_inputs, load_teacher
from distill.models.base import DepthModel
from distill.registry import Registry

SUPERVISED = "none"  # kd.method of plain supervised training

Builder = Callable[[DepthModel, DepthModel | None, Config, Section], Method]


@dataclass(frozen=True)
class MethodEntry:
    """A registered method.

    Attributes:
        settings: the schema of its `kd.<name>:` section (defaults included).
        build: (student, frozen teacher or None, config, settings) -> the Method.
        teacher: whether it distils from the config's `teacher:` (loaded before `build`).
        cached_teacher: whether it accepts `precomputed:` teacher maps (then `data.crop` is refused).
    """

    settings: type[Section]
    build: Builder
    teacher: bool = True
    cached_teacher: bool = True


METHODS: Registry[MethodEntry] = Registry("kd.method")


def register_method(
    name: str, *, settings: type[Section], teacher: bool = True, cached_teacher: bool = True
) -> Callable[[Builder], Builder]:
    """Decorator registering a method's builder under `name` (see the module docstring); a taken name raises."""

    def decorate(build: Builder) -> Builder:
        METHODS.register(name, MethodEntry(settings, build, teacher, cached_teacher))
        return build

    return decorate


def _discover() -> None:
    """Import every module of distill.kd once, so each method file has registered itself."""
    package = importlib.import_module("distill.kd")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"distill.kd.{module.name}")


def method_names() -> list[str]:
    """Every value `kd.method` accepts: "none" and the registered methods."""
    _discover()
    return [SUPERVISED, *METHODS.names()]


def resolve_kd(config: Config) -> None:
    """Turn the `kd:` section into typed settings, in place: `config.kd.<name>` becomes that method's settings
    model for every registered method (a missing section takes the schema's defaults).

    Raises:
        UserError: an unknown `kd.method` or section (with close matches), a key or value a schema refuses, a
            missing path in the selected method's settings.
    """
    choices = method_names()
    if config.kd.method not in choices:
        raise UserError(
            f"config: kd.method: unknown method {config.kd.method!r}{did_you_mean(config.kd.method, choices)}; "
            f"choices: {', '.join(choices)}"
        )
    sections = dict(config.kd.model_extra or {})
    for name in sections:
        if name not in METHODS:
            known = [f"kd.{choice}" for choice in ["method", *METHODS.names()]]
            raise UserError(f"config: kd.{name}: unknown key{did_you_mean(f'kd.{name}', known)}")
    for name in METHODS.names():
        raw = sections.get(name, {})
        if isinstance(raw, BaseModel):
            continue
        settings = None if raw is None else validate_section(METHODS.get(name).settings, raw, f"kd.{name}")
        setattr(config.kd, name, settings)
    if config.kd.method != SUPERVISED:
        require_paths(kd_section(config, config.kd.method).model_dump(), f"kd.{config.kd.method}")


def kd_section(config: Config, name: str) -> Section:
    """`config.kd.<name>`, the method's typed settings (resolving the `kd:` section first if it is still raw)."""
    sections = config.kd.model_extra or {}
    if name not in sections or not isinstance(sections[name], BaseModel | None):
        resolve_kd(config)
    section = getattr(config.kd, name, None)
    if section is None:
        raise UserError(
            f"kd.{name}: section missing (null) while kd.method={config.kd.method}; see config/default.yaml"
        )
    return section


def build_method(config: Config, student: DepthModel, device: torch.device) -> Method:
    """The Method `kd.method` names, on `device`: supervised for "none", else the registered method, built after
    its settings are validated and its teacher loaded and checked."""
    resolve_kd(config)
    name = config.kd.method
    if name == SUPERVISED:
        train = config.train
        return SupervisedMethod(student, train.silog_alpha, train.silog_lambda, train.chamfer_weight)
    entry = METHODS.get(name)
    settings = kd_section(config, name)
    teacher = load_teacher(config, device) if entry.teacher else None
    if teacher is not None and entry.cached_teacher:
        check_cached_inputs(config, teacher)
    return entry.build(student, teacher, config, settings).to(device)


def default_settings() -> Mapping[str, Mapping]:
    """Each registered method's settings defaults as plain data (what `config/default.yaml` documents)."""
    _discover()
    return {name: METHODS.get(name).settings().model_dump(mode="json") for name in METHODS.names()}
