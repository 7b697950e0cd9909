"""Checkpoints: a folder of safetensors (model, optimizer and method tensors) plus `state.json` (everything else).

Layout of one checkpoint folder (`run_dir/last`, `run_dir/best`):
    model.safetensors      the trained model's state dict (rebuild the model from state.json "model", its spec)
    optimizer.safetensors  the optimizer's tensors (Adam moments, steps), referenced from state.json
    method.safetensors     trainable modules of a KD method besides the model (absent for supervised training)
    state.json             step, epoch, lr, optimizer non-tensor state, grad scaler, RNG states, resolved config

A folder is written beside the target and swapped in with renames, so a kill at any moment leaves either the old
or the new checkpoint complete; `resolve_checkpoint` also finds the old one if a kill hit between the two renames.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from distill.errors import UserError

STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METHOD_FILE = "method.safetensors"


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    method_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see module docstring).

    Args:
        directory: the checkpoint folder to (re)place, e.g. run_dir / "last".
        model: the unwrapped model (not DDP); must carry `.spec` for `load_model_from_checkpoint`.
        state: JSON-able run state (step, epoch, lr, config, rng, ...); "model" and "optimizer" are added here.
        optimizer: its state is split into tensors (optimizer.safetensors) and the rest (state.json).
        method_tensors: extra named tensors of a KD method, or None.

    Returns:
        The checkpoint folder.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    full_state = {**state, "model": getattr(model, "spec", None)}
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        full_state["optimizer"] = _split_tensors(optimizer.state_dict(), "", tensors)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / OPTIMIZER_FILE))
    if method_tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in method_tensors.items()}, str(tmp / METHOD_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
    _fsync(*tmp.iterdir(), tmp)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _fsync(*paths: Path) -> None:
    """Flush files and folder entries to disk, so a rename never publishes half-written files after a crash."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve_checkpoint(path: Path | str, prefer: tuple[str, ...] = ("best", "last")) -> Path:
    """The checkpoint folder meant by `path`: a checkpoint folder, a file inside one, or a run folder.

    For a run folder the first existing of `prefer` (sub-folders) is taken; a folder left as `.NAME.old` by a kill
    during a swap counts as NAME.

    Raises:
        UserError: nothing that looks like a checkpoint at `path`.
    """
    path = Path(path)
    if path.is_file() and path.name in (STATE_FILE, MODEL_FILE):
        path = path.parent
    if (path / STATE_FILE).is_file():
        return path
    for name in prefer:
        for candidate in (path / name, path / f".{name}.old"):
            if (candidate / STATE_FILE).is_file():
                return candidate
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    raise UserError(f"{path}: not a checkpoint (no {STATE_FILE}) nor a run folder with {' or '.join(prefer)}/")


def read_state(directory: Path) -> dict:
    """state.json of a checkpoint folder."""
    try:
        return json.loads((Path(directory) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{directory / STATE_FILE}: unreadable checkpoint state ({error})") from None


def load_model_from_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a trained model from a checkpoint.

    Args:
        path: checkpoint folder, a file in it, or a run folder (its best/, else last/).
        device: where to put the model.

    Returns:
        (model in eval mode, the run's resolved config as a dict).
    """
    from distill.models import build_model

    directory = resolve_checkpoint(path)
    state = read_state(directory)
    if not state.get("model"):
        raise UserError(f"{directory / STATE_FILE}: no model spec, cannot rebuild the model")
    model = build_model(state["model"])
    load_model_weights(model, directory)
    return model.to(device).eval(), state.get("config", {})


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load model.safetensors of a checkpoint folder into `model` (strict)."""
    try:
        load_model(model, str(Path(directory) / MODEL_FILE), strict=True)
    except (OSError, RuntimeError, SafetensorError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{directory / MODEL_FILE}: cannot load it into the model ({reason})") from None


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, state: Mapping[str, Any]) -> None:
    """Restore an optimizer saved by `save_checkpoint` (its param groups must match in order and size)."""
    tensors = load_file(str(Path(directory) / OPTIMIZER_FILE))
    saved = _join_tensors(state["optimizer"], tensors)
    # JSON turned the state's int keys into strings and tuples (betas) into lists.
    saved["state"] = {int(index): value for index, value in saved["state"].items()}
    for group, current in zip(saved["param_groups"], optimizer.param_groups):
        group.update({k: tuple(v) for k, v in group.items() if isinstance(current.get(k), tuple)})
    optimizer.load_state_dict(saved)


def load_method_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """method.safetensors of a checkpoint folder, or {} when the run had no extra method modules."""
    path = Path(directory) / METHOD_FILE
    return load_file(str(path)) if path.is_file() else {}


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A copy of a nested dict/list with every tensor moved into `tensors` and replaced by {"__tensor__": key}."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {str(k): _split_tensors(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `_split_tensors`."""
    if isinstance(obj, Mapping):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def capture_rng() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, _b64(torch.from_numpy(np.asarray(internal, dtype=np.uint32))), gauss],
        "numpy": [name, _b64(torch.from_numpy(keys.astype(np.uint32))), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng` (CUDA states only when this machine has as many devices)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in _unb64(internal).numpy().view(np.uint32)), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, _unb64(keys).numpy().view(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


def _b64(tensor: torch.Tensor) -> str:
    """Raw bytes of a CPU tensor as base64 text."""
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    """Inverse of `_b64`, as a uint8 tensor (view the numpy array to get the original dtype back)."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
