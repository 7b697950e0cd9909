"""Dataset kinds: the `data:` keys every kind shares, and the registry each kind adds itself to from its own file.

A kind (distill/data/kinds/<kind>.py) subclasses `DataConfig` with `kind: Literal["<kind>"]` and its own keys (with
their defaults there), and registers it with its default depth range, default evaluation crop and builder:

    class FooConfig(DataConfig):
        kind: Literal["foo"]
        scale: float = 1.0  # (float) the kind's own key

    @register_dataset(FooConfig, depth_range=(1e-3, 80.0), eval_crop="garg")
    def build_foo(data: FooConfig, split: str, transform: Transform | None) -> Dataset: ...

`DataConfig.model_validate(raw)` then validates a raw `data:` section as the class its `kind` names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from distill.errors import UserError
from distill.registry import Registry

if TYPE_CHECKING:
    from torch.utils.data import Dataset

Transform = Callable[[dict[str, Any]], dict[str, Any]]


class DataConfig(BaseModel):
    """The keys of `data:` every kind has (their defaults live in config/default.yaml).

    min_depth / max_depth (metres) given as None become the kind's default range when validated.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str
    root: Path | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    min_depth: float | None
    max_depth: float | None
    batch_size: int
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] | None
    train_split: str
    val_split: str | None
    test_split: str

    @model_validator(mode="wrap")
    @classmethod
    def _as_its_kind(cls, value: Any, handler: Callable[[Any], DataConfig]) -> DataConfig:
        """Validate a raw section as the registered class of its `kind` (errors keep their key, e.g. data.gt)."""
        if cls is not DataConfig or not isinstance(value, Mapping):
            return handler(value)
        return config_class(value).model_validate(value)

    @model_validator(mode="after")
    def _fill_depth_range(self) -> DataConfig:
        low, high = DATASETS.get(self.kind).depth_range
        self.min_depth = low if self.min_depth is None else self.min_depth
        self.max_depth = high if self.max_depth is None else self.max_depth
        if not 0 <= self.min_depth < self.max_depth:
            message = f"{self.min_depth} must be >= 0 and below data.max_depth ({self.max_depth})"
            raise _error("min_depth", message, self.min_depth)
        return self

    @property
    def eval_crop(self) -> str:
        """The kind's default evaluation crop (`eval.crop` null): garg, eigen, nyu or none."""
        return DATASETS.get(self.kind).eval_crop


@dataclass(frozen=True)
class DatasetKind:
    """One registered kind: its config class, default (min, max) depth in metres, evaluation crop and builder.

    `build(data, split, transform)` returns the dataset of `split` ("train", "val", "test"), each sample passed
    through `transform` (None: none).
    """

    config: type[DataConfig]
    depth_range: tuple[float, float]
    eval_crop: str
    build: Callable[[Any, str, Transform | None], Dataset]


DATASETS: Registry[DatasetKind] = Registry("dataset kind")


def register_dataset(config: type[DataConfig], depth_range: tuple[float, float], eval_crop: str) -> Callable:
    """Decorator registering a builder under the kind its `config` class names (`kind: Literal["<kind>"]`)."""
    names = get_args(config.model_fields["kind"].annotation)
    if len(names) != 1 or not isinstance(names[0], str):
        raise ValueError(f"{config.__name__}.kind must be Literal['<kind>'], got {config.model_fields['kind']}")

    def register(build: Callable) -> Callable:
        DATASETS.register(names[0], DatasetKind(config, depth_range, eval_crop, build))
        return build

    return register


def config_class(raw: Mapping[str, Any]) -> type[DataConfig]:
    """The config class of a raw `data:` section's kind; an unknown or missing kind raises a ValidationError at
    `kind` (with the registered kinds and a close match)."""
    kind = raw.get("kind")
    if kind is None:
        raise ValidationError.from_exception_data("DataConfig", [{"type": "missing", "loc": ("kind",), "input": raw}])
    try:
        return DATASETS.get(str(kind)).config
    except UserError as error:
        raise _error("kind", str(error), kind) from None


def _error(key: str, message: str, value: Any) -> ValidationError:
    """A ValidationError at `key` whose message is reported as is (a value error: no "got" appended)."""
    error = PydanticCustomError("value_error", message)  # without a context, braces in `message` stay as they are
    return ValidationError.from_exception_data("DataConfig", [{"type": error, "loc": (key,), "input": value}])
