"""The teacher spec grammar and the registry each scheme file adds itself to, with the options it declares.

A spec is `<prefix>:<name>`. Schemes whose name is a file or folder also take options after it,
`<prefix>:<path>?key=value&key=value`. Every scheme takes its options as keywords too, `build_teacher(spec,
**options)` (a checkpoint's stored spec; model.encoder_weights when training a teacher), overriding the spec's.
Option values are text as a spec writes them (a list [H, W] is written HxW); each option's parser turns the text
into the value its builder receives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args
from urllib.parse import parse_qsl

from distill.errors import UserError, did_you_mean
from distill.models.base import DepthModel, OutputKind
from distill.registry import Registry


@dataclass(frozen=True)
class Option:
    """One option a teacher scheme takes.

    Attributes:
        name: the key, also the builder's keyword argument.
        parse: text -> value; raises ValueError or UserError with a message naming the key and what it must be.
        meaning: what it sets, with units.
    """

    name: str
    parse: Callable[[str], Any]
    meaning: str


@dataclass(frozen=True)
class TeacherScheme:
    """How the teachers of one spec prefix are built.

    Attributes:
        prefix: the spec's "<prefix>:".
        build: `build(name, *, img_size, head_kw, **options)` -> the teacher. `name` is the spec after the prefix
            (a `Path` for path schemes, its "?" part removed), `img_size` the (H, W) pixels the teacher is built
            for, `head_kw` the `DepthHead` keywords (their min_depth/max_depth: the caller's range in metres), and
            `options` the parsed values of the options given.
        options: the options it takes.
        path: the name is a file or folder and options may follow it after "?".
    """

    prefix: str
    build: Callable[..., DepthModel]
    options: tuple[Option, ...]
    path: bool

    def resolve(self, name: str, spec: str, keywords: Mapping[str, Any]) -> tuple[str | Path, dict[str, Any]]:
        """(what `build` takes as name, parsed options) from a spec's name and keyword options.

        Raises:
            UserError: malformed "?" options, an option the scheme does not take (with close matches and the
                scheme's list), or a value its parser refuses; the message quotes `spec`.
        """
        given: dict[str, str] = {}
        if self.path:
            name, _, query = name.partition("?")
            try:
                given = dict(parse_qsl(query, strict_parsing=True)) if query else {}
            except ValueError:
                raise UserError(f"teacher spec {spec!r}: options must look like ?key=value&key=value") from None
        given.update({key: _as_text(value) for key, value in keywords.items()})
        declared = {option.name: option for option in self.options}
        for key in given:
            if key not in declared:
                raise UserError(
                    f"teacher spec {spec!r}: unknown option {key!r}{did_you_mean(key, declared)}"
                    f" (options: {', '.join(declared) or 'none'})"
                )
        parsed = {}
        for option in self.options:
            if option.name in given:
                try:
                    parsed[option.name] = option.parse(given[option.name])
                except (ValueError, UserError) as error:
                    raise UserError(f"teacher spec {spec!r}: {error}") from None
        return (Path(name).expanduser() if self.path else name), parsed


TEACHERS: Registry[TeacherScheme] = Registry("teacher prefix")


def register_teacher(prefix: str, *options: Option, path: bool = False) -> Callable:
    """Decorator adding a builder to `TEACHERS` as the scheme `prefix` taking `options` (see `TeacherScheme`)."""

    def register(build: Callable[..., DepthModel]) -> Callable[..., DepthModel]:
        TEACHERS.register(prefix, TeacherScheme(prefix, build, tuple(options), path))
        return build

    return register


def _as_text(value: Any) -> str:
    """A keyword option's value as a spec writes it: [H, W] -> "HxW", anything else str()."""
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def parse_output_kind(text: str) -> str:
    """The output kind `text` names; ValueError unless it is metric, relative_depth or relative_disparity."""
    if text not in get_args(OutputKind):
        raise ValueError(f"output_kind must be one of {', '.join(get_args(OutputKind))}, got {text!r}")
    return text


OUTPUT_KIND = Option(
    "output_kind", parse_output_kind, "metric, relative_depth or relative_disparity; overrides what the model declares"
)
