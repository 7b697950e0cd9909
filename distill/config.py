"""Typed run configuration: config/default.yaml, overridden by an experiment YAML, overridden by `key=value`.

`config/default.yaml` is the single source of defaults (every key commented there); the pydantic models below give
the types and reject unknown keys with a close-match suggestion. Every mistake becomes a one-line `UserError`
naming the dotted key (`train.stpes: unknown key, did you mean train.steps?`). The `data:` section is validated as
the class its `kind` registered (distill/data/kinds/): default.yaml gives the keys every kind shares, and each kind's
own keys take their defaults from its class.

The `kd:` section is the exception: each distillation method declares the schema (and defaults) of its own
`kd.<name>:` block in its file, and `distill.kd.registry.resolve_kd` types those blocks when a run is built.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from distill.data.registry import DATASETS, DataConfig, config_class  # importing distill.data registers every kind
from distill.errors import UserError, did_you_mean

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "default.yaml"


class Section(BaseModel):
    """A config section: unknown keys are errors; no defaults here (they live in config/default.yaml)."""

    model_config = ConfigDict(extra="forbid")


SectionT = TypeVar("SectionT", bound=BaseModel)


class RunConfig(Section):
    name: str
    task: Literal["depth", "completion"]
    out_dir: Path
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    resume: bool
    tensorboard: bool


class ModelConfig(Section):
    kind: Literal["student", "teacher"]
    arch: str
    spec: str
    bins: int
    min_depth: float | None
    max_depth: float | None
    lgconv: bool
    decoder_width: int
    output_stride: Literal[2, 4]
    encoder_weights: Path | None
    weights: Path | None


class TrainConfig(Section):
    steps: int | None
    epochs: int | None
    lr: float
    lr_end: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float | None
    amp: Literal["auto", "none", "bf16", "fp16"]
    silog_alpha: float
    silog_lambda: float
    chamfer_weight: float
    val_every: int
    log_every: int
    ckpt_every: int
    best_metric: Literal["abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3"]

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs (the other to null)")
        return self


class KDConfig(Section):
    """`method` names the distillation method ("none": supervised training); every other key is one method's
    section, typed by that method's own settings schema (`distill.kd.registry.resolve_kd`)."""

    model_config = ConfigDict(extra="allow")

    method: str


class CompletionSettings(Section):
    """`completion:`: the network `run.task: completion` trains on top of the frozen `model:` (distill/completion/)."""

    widths: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2)]
    output_stride: Literal[1, 2]
    lidar_gate: bool
    l1_weight: Annotated[float, Field(ge=0)]
    l2_weight: Annotated[float, Field(ge=0)]
    log_l1_weight: Annotated[float, Field(ge=0)]
    align_method: Literal["huber", "ransac"]
    align_min_points: Annotated[int, Field(ge=2)]


class TeacherConfig(Section):
    spec: str | None
    weights: Path | None


class EvalConfig(Section):
    crop: Literal["garg", "eigen", "nyu", "none"] | None
    align: Literal["none", "median", "lsq"]


class Config(Section):
    run: RunConfig
    data: SerializeAsAny[DataConfig]  # validated and saved as the class of its kind (distill.data.kinds)
    model: ModelConfig
    train: TrainConfig
    kd: KDConfig
    completion: CompletionSettings
    teacher: TeacherConfig
    eval: EvalConfig


def load_config(path: Path | str | None, overrides: Sequence[str] = (), check_paths: bool = True) -> Config:
    """Resolve a run's configuration.

    Args:
        path: experiment YAML overriding config/default.yaml, or None for the defaults alone.
        overrides: `dotted.key=value` strings (value parsed as YAML); a bare key unique to one section
            (`resume=true`) is accepted too.
        check_paths: also require every configured data/weights path to exist.

    Raises:
        UserError: unreadable YAML, unknown key, wrong type or missing path; the message names the key.
    """
    raw = read_yaml(DEFAULT_CONFIG)
    if path is not None:
        raw = merge_layer(raw, read_yaml(Path(path)))
    for text in overrides:
        raw = merge_layer(raw, parse_override(text, raw))
    config = validate(raw)
    fill_depth_ranges(config)
    if check_paths:
        check_paths_exist(config)
    return config


def read_yaml(path: Path) -> dict:
    """A YAML mapping from a file (safe_load only); {} for an empty file."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (run:, data:, ...), got {type(data).__name__}")
    return data


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """`base` updated recursively by `override` (mappings merge, anything else replaces); inputs unchanged."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def merge_layer(base: Mapping, layer: Mapping) -> dict:
    """`base` updated by one more layer (an experiment file or one override). The run length is one choice: a layer
    that sets train.steps (or train.epochs) but not the other clears the other, so `train.steps=100` alone replaces
    the epochs of the defaults or of the experiment file. A layer that sets both keeps them for validation."""
    merged = deep_merge(base, layer)
    train = layer.get("train")
    if isinstance(train, Mapping) and isinstance(merged.get("train"), Mapping):
        for key, other in (("steps", "epochs"), ("epochs", "steps")):
            if train.get(key) is not None and other not in train:
                merged["train"][other] = None
    return merged


def parse_override(text: str, current: Mapping) -> dict:
    """`a.b=value` -> {"a": {"b": value}} with value parsed by yaml.safe_load (so `[1, 2]`, `null`, `true` work).

    A bare key that exists in exactly one section of `current` is placed in that section.
    """
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        raise UserError(f"override {key}: value {value_text!r} is not valid YAML") from None
    parts = key.split(".")
    if len(parts) == 1:
        sections = [
            name for name, section in current.items() if isinstance(section, Mapping) and key in _keys(name, section)
        ]
        if len(sections) > 1:
            raise UserError(f"override {key!r} is ambiguous: use one of {[f'{s}.{key}' for s in sections]}")
        parts = [sections[0], key] if sections else parts
    for part in reversed(parts):
        value = {part: value}
    return value


def _keys(name: str, section: Mapping) -> set[str]:
    """The keys a raw section has or may have: its own and, for `data`, every key of its dataset kind."""
    keys = set(section)
    if name == "data":
        with contextlib.suppress(ValidationError):
            keys |= set(config_class(section).model_fields)
    return keys


def validate(raw: Mapping) -> Config:
    """Type-check a merged config dict; all problems reported on one line, each naming its dotted key."""
    return validate_section(Config, raw, "")


def validate_section(model: type[SectionT], raw: Any, key: str) -> SectionT:
    """`model` validated from `raw`, every problem on one line as `dotted.key: problem` (keys below `key`).

    Raises:
        UserError: "config: " and the problems, each naming its dotted key (unknown keys with a close match).
    """
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise UserError("config: " + "; ".join(_describe(item, model, raw, key) for item in error.errors())) from None


def load_data_config(keys: Mapping[str, Any]) -> DataConfig:
    """A `data:` section: config/default.yaml's updated by `keys` (values as YAML gives them, paths may be Paths),
    validated as in `load_config` (mistakes are one-line UserErrors naming data.<key>); paths are not checked."""
    return validate(deep_merge(read_yaml(DEFAULT_CONFIG), {"data": keys})).data


def _describe(item: Mapping[str, Any], root: type[BaseModel], raw: Any, prefix: str) -> str:
    """One pydantic error of validating `root` from `raw` (found at dotted key `prefix`) as `dotted.key: problem`;
    `raw` picks the data kind's keys."""
    loc = [str(part) for part in item["loc"] if not isinstance(part, int)]
    base = [prefix] if prefix else []
    key = ".".join(base + loc)
    if item["type"] == "extra_forbidden":
        choices = [".".join([*base, *loc[:-1], name]) for name in _fields_at(root, loc[:-1], raw)]
        hint = _kind_hint(loc, raw) if root is Config else ""
        return f"{key}: unknown key{hint or did_you_mean(key, choices)}"
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "missing":
        return f"{key}: missing (every key needs a value; see config/default.yaml)"
    got = item.get("input")
    shown = f" (got {got!r})" if not isinstance(got, Mapping) and item["type"] != "value_error" else ""
    return f"{key}: {message}{shown}" if key else message


def _fields_at(root: type[BaseModel], loc: Sequence[str], raw: Any) -> list[str]:
    """Field names of the section model at a path of field names below `root` (`root` itself for []); `data` is
    the class of the kind `raw` names there."""
    model, value = root, raw
    for name in loc:
        field = model.model_fields.get(name)
        if field is None:
            return []
        candidates = [field.annotation, *get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model, value = nested[0], value.get(name) if isinstance(value, Mapping) else None
        if model is DataConfig and isinstance(value, Mapping):
            with contextlib.suppress(ValidationError):
                model = config_class(value)
    return list(model.model_fields)


def _kind_hint(loc: Sequence[str], raw: Mapping) -> str:
    """ " for data.kind 'nyu' (a key of kitti)" when an unknown data key belongs to other dataset kinds."""
    if len(loc) != 2 or loc[0] != "data":
        return ""
    owners = [name for name in DATASETS.names() if loc[1] in DATASETS.get(name).config.model_fields]
    return f" for data.kind {raw['data'].get('kind')!r} (a key of {', '.join(owners)})" if owners else ""


def fill_depth_ranges(config: Config) -> None:
    """Null model depth bounds follow the data's (themselves the dataset kind's range when null)."""
    data, model = config.data, config.model
    model.min_depth = data.min_depth if model.min_depth is None else model.min_depth
    model.max_depth = data.max_depth if model.max_depth is None else model.max_depth


def changed_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (present in either)."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, dotted = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += changed_keys(a, b, f"{dotted}.")
        elif a != b:
            changed.append(dotted)
    return changed


def check_paths_exist(config: Config) -> None:
    """Every configured input path (any Path-typed key but run.out_dir) must exist; the error names key and path."""
    require_paths(config.model_dump(), "", skip=("run.out_dir",))


def require_paths(dumped: Any, key: str, skip: Sequence[str] = ()) -> None:
    """Every Path inside a dumped config or section found at dotted `key` must exist, but those keyed in `skip`.

    Raises:
        UserError: `dotted.key: path does not exist: PATH` for the first missing one.
    """
    for dotted, path in _paths(dumped, key):
        if dotted not in skip and not path.exists():
            raise UserError(f"{dotted}: path does not exist: {path}")


def _paths(value: Any, key: str) -> Iterator[tuple[str, Path]]:
    """(dotted key, path) of every Path inside a dumped config or section found at `key`; list items are keyed
    `key[i]`."""
    if isinstance(value, Path):
        yield key, value
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _paths(item, f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, f"{key}[{index}]")


def to_dict(config: Config) -> dict:
    """Plain JSON/YAML-able dict of a config (paths as strings, tuples as lists)."""
    return config.model_dump(mode="json")


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (re-loadable as an experiment file)."""
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
