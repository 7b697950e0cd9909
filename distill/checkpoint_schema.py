"""The typed schema of a checkpoint's state.json: every field that a load reads, checked before anything uses it.

State files are validated from their JSON text in strict mode (no "3" for 3, no true for 1). Every field is
optional, because other writers and older checkpoints carry fewer; keys no load reads pass unchecked. The trainer's
fields (distill/training/trainer.py `_save`):
    step, epoch, total_steps   optimiser steps done, epochs begun, steps the run trains for
    lr                         learning rate of the last step
    world_size, rng            number of processes, and each one's RNG states (`distill.checkpoint.capture_rng`)
    progress                   `distill.training.trainer.Progress` (step, best_value, best_step, last_metrics)
    scaler                     torch.amp.GradScaler state ({} when the run did not train in float16)
    config                     the run's resolved config
Added by `distill.checkpoint.save_checkpoint`: model (the model spec), optimizer (its non-tensor state),
files (the manifest of the tensor files) and sha256 (the digest of the state's own canonical JSON).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

MT19937_WORDS = 624  # words of a Mersenne Twister state (python's `random` and numpy's legacy generator)
TORCH_STATE_BYTES = torch.get_rng_state().numel()  # size of this torch's CPU generator state

NonNegative = Annotated[int, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _encoded_bytes(size: int) -> Callable[[str], str]:
    """A check that a text is base64 of exactly `size` bytes."""

    def check(text: str) -> str:
        try:
            data = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError("not base64 text") from None
        if len(data) != size:
            raise ValueError(f"{size} bytes of state expected, got {len(data)}")
        return text

    return check


def _mt19937_index(text: str) -> str:
    """Python's state ends with the position in its key (0-624): `random.setstate` refuses any other."""
    if int.from_bytes(base64.b64decode(text)[-4:], "little") > MT19937_WORDS:
        raise ValueError(f"position in the key past {MT19937_WORDS}")
    return text


PythonKey = Annotated[str, AfterValidator(_encoded_bytes(4 * (MT19937_WORDS + 1))), AfterValidator(_mt19937_index)]
NumpyKey = Annotated[str, AfterValidator(_encoded_bytes(4 * MT19937_WORDS))]
TorchState = Annotated[str, AfterValidator(_encoded_bytes(TORCH_STATE_BYTES))]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RngState(_Schema):
    """One process's RNG states, as `distill.checkpoint.capture_rng` writes them (keys are base64 uint32 words)."""

    python: tuple[Literal[3], PythonKey, float | None]  # random.getstate(): version, key + position, cached gauss
    numpy: tuple[Literal["MT19937"], NumpyKey, Annotated[int, Field(ge=0, le=MT19937_WORDS)], Literal[0, 1], float]
    torch: TorchState
    cuda: list[str] | None = None  # one state per device; sizes are checked against the devices when restored


class ProgressState(_Schema):
    """Where the run stood: the fields of `distill.training.trainer.Progress`, no others."""

    step: NonNegative = 0
    best_value: float | None = None
    best_step: NonNegative | None = None
    last_metrics: dict[str, float] = {}


class ScalerState(_Schema):
    """torch.amp.GradScaler.state_dict() of a float16 run."""

    scale: Annotated[float, Field(gt=0)]
    growth_factor: Annotated[float, Field(gt=1)]
    backoff_factor: Annotated[float, Field(gt=0, lt=1)]
    growth_interval: Annotated[int, Field(gt=0)]
    growth_tracker: NonNegative = Field(alias="_growth_tracker")


class TensorRef(_Schema):
    """A tensor moved into optimizer.safetensors, by its key there."""

    tensor: str = Field(alias="__tensor__")


class ParamGroup(_Schema):
    """One AdamW parameter group (further keys of newer torch releases pass unchecked)."""

    model_config = ConfigDict(extra="allow")
    params: list[NonNegative]
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: bool = False
    maximize: bool = False


class OptimizerState(_Schema):
    """An optimizer's state_dict() without its tensors: per-parameter state keyed by parameter index."""

    state: dict[Annotated[str, Field(pattern=r"^\d+$")], dict[str, TensorRef | float]]
    param_groups: Annotated[list[ParamGroup], Field(min_length=1)]


class FileEntry(_Schema):
    """Size and digest of one file of the checkpoint folder."""

    bytes: NonNegative
    sha256: Sha256


class DataSection(_Schema):
    """The config's data section, as far as loads read it."""

    model_config = ConfigDict(extra="allow")
    size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = None  # HEIGHT, WIDTH pixels


class RunConfig(_Schema):
    """The run's resolved config, as far as loads read it (`distill.config.Config` checks it at training time)."""

    model_config = ConfigDict(extra="allow")
    data: DataSection | None = None
    model: dict[str, Any] | None = None


def _plain_names(files: dict[str, FileEntry | None]) -> dict[str, FileEntry | None]:
    """The manifest names files inside the checkpoint folder only, the model file among them."""
    for name in files:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"{name!r} is not the name of a file in the checkpoint folder")
    if "model.safetensors" not in files:
        raise ValueError("model.safetensors is not listed")
    return files


def _none_if_empty(value: Any) -> Any:
    return None if value == {} else value


class CheckpointState(_Schema):
    """A state.json (see the module docstring)."""

    model_config = ConfigDict(extra="allow")
    step: NonNegative = 0
    epoch: NonNegative = 0
    lr: Annotated[float, Field(ge=0)] = 0.0
    total_steps: NonNegative = 0
    world_size: Annotated[int, Field(gt=0)] = 1
    progress: ProgressState | None = None
    scaler: Annotated[ScalerState | None, BeforeValidator(_none_if_empty)] = None
    rng: Annotated[list[RngState], Field(min_length=1)] | None = None
    config: RunConfig | None = None
    model: dict[str, Any] | None = None  # the spec `distill.models.load_model` builds the model from
    optimizer: OptimizerState | None = None
    files: Annotated[dict[str, FileEntry | None], AfterValidator(_plain_names)] | None = None
    sha256: Sha256 | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointState:
        if self.progress is not None and "step" in self.model_fields_set and self.progress.step != self.step:
            raise ValueError(f"progress.step {self.progress.step} differs from step {self.step}")
        if self.rng is not None and "world_size" in self.model_fields_set and len(self.rng) != self.world_size:
            raise ValueError(f"rng holds {len(self.rng)} states for world_size {self.world_size}")
        return self


def describe(error: ValidationError) -> str:
    """A pydantic error on one line: `field.path: problem` for each problem, "; "-separated."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{_dotted(item['loc'])}: {message}" if item["loc"] else message)  # no loc: a whole-state rule
    return "; ".join(problems)


def _dotted(loc: tuple[str | int, ...]) -> str:
    """("rng", 0, "numpy", 1) -> "rng[0].numpy[1]"; ("optimizer", "state", "x", "[key]") -> "optimizer.state.x (key)"
    (a problem with the key x itself)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "[key]":
            text += " (key)"
        else:
            text += f".{part}" if text else part
    return text
