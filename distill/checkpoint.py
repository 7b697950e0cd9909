"""Checkpoints: a folder of safetensors (model, optimizer and method tensors) plus `state.json` (everything else).

Layout of one checkpoint folder (`run_dir/last`, `run_dir/best`):
    model.safetensors      the trained model's state dict (rebuild the model from state.json "model", its spec)
    optimizer.safetensors  the optimizer's tensors (Adam moments, steps), referenced from state.json
    method.safetensors     trainable modules of a KD method besides the model (absent for supervised training)
    state.json             step, epoch, lr, optimizer non-tensor state, grad scaler, RNG states, resolved config,
                           "files": the size and SHA-256 of each file above (the manifest a load verifies), and
                           "sha256": the SHA-256 of the state's own canonical JSON (which covers state.json itself)
Every read of state.json checks that digest and the typed schema of `distill.checkpoint_schema`, so an edited or
malformed state is a one-line UserError naming the file and the field. Checkpoints written before the digest (or
the manifest) existed have none and are accepted.

Crash safety: a checkpoint is written into `.NAME.tmp` beside its target, tensors first and flushed to disk, then
state.json, so a state.json exists only once the files it lists are complete. The folder is swapped in with two
renames (NAME -> .NAME.old, .NAME.tmp -> NAME). A kill at any moment (even a power loss) leaves at least one
complete checkpoint among NAME, .NAME.old and .NAME.tmp: `resolve_checkpoint` verifies them against their manifest
and takes the newest complete one, with a warning for each one it skips, and the next save publishes it first.
Checkpoints hold no pickles: tensors are read with safetensors, everything else is JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from distill.checkpoint_schema import CheckpointState, RngState, describe
from distill.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_DIGEST = "sha256"  # the key of state.json that holds the SHA-256 of the rest of it, as canonical JSON
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
    """Write a checkpoint folder so that a kill at any moment leaves a complete one (see module docstring).

    Args:
        directory: the checkpoint folder to (re)place, e.g. run_dir / "last".
        model: the unwrapped model (not DDP); must carry `.spec` for `distill.models.load_model`.
        state: JSON-able run state (step, epoch, lr, config, rng, ...); "model", "optimizer" and "files" are added.
        optimizer: its state is split into tensors (optimizer.safetensors) and the rest (state.json).
        method_tensors: extra named tensors of a KD method, or None.

    Returns:
        The checkpoint folder.
    """
    directory = Path(directory)
    tmp, old = _variant(directory, "tmp"), _variant(directory, "old")
    _publish_newest(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    _write_folder(tmp, model, state, optimizer, method_tensors)
    shutil.rmtree(old, ignore_errors=True)  # `directory`, when it exists, is complete: the older copy can go
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _write_folder(
    folder: Path,
    model: nn.Module,
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None,
    method_tensors: Mapping[str, torch.Tensor] | None,
) -> None:
    """The checkpoint's files in a new folder: tensors first, flushed, then state.json with their manifest."""
    folder.mkdir(parents=True)
    save_model(model, str(folder / MODEL_FILE))
    full_state = {**state, "model": getattr(model, "spec", None)}
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        full_state["optimizer"] = _split_tensors(optimizer.state_dict(), "", tensors)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / OPTIMIZER_FILE))
    if method_tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in method_tensors.items()}, str(folder / METHOD_FILE))
    files = sorted(folder.iterdir())
    _fsync(*files)
    full_state["files"] = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)} for path in files}
    write_state(folder, full_state)
    _fsync(folder / STATE_FILE, folder)


def write_state(directory: Path, state: Mapping[str, Any]) -> None:
    """Write state.json with the SHA-256 of its canonical JSON under STATE_DIGEST (any previous digest replaced)."""
    body = json.loads(json.dumps({k: v for k, v in state.items() if k != STATE_DIGEST}))  # as a reader will see it
    (Path(directory) / STATE_FILE).write_text(json.dumps({**body, STATE_DIGEST: _state_digest(body)}, indent=1))


def _state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a state as canonical JSON (sorted keys, no spaces), without its STATE_DIGEST key."""
    body = {k: v for k, v in state.items() if k != STATE_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _variant(directory: Path, kind: str) -> Path:
    """.NAME.tmp (being written) or .NAME.old (being replaced) beside checkpoint folder NAME."""
    return directory.with_name(f".{directory.name}.{kind}")


def _publish_newest(directory: Path) -> None:
    """After a kill during a save, make the newest complete of NAME, .NAME.tmp and .NAME.old the folder NAME, so the
    save that follows never deletes the only (or the newest) complete checkpoint. A no-op without leftovers."""
    leftovers = [v for v in (_variant(directory, "tmp"), _variant(directory, "old")) if v.exists()]
    if not leftovers:
        return
    newest, _ = _newest_complete([directory, *leftovers])
    if newest is None or newest == directory:
        return
    if directory.exists():
        shutil.rmtree(directory)  # older or incomplete; a kill meanwhile still leaves `newest` complete
    os.replace(newest, directory)


def _fsync(*paths: Path) -> None:
    """Flush files and folder entries to disk, so a rename never publishes half-written files after a crash."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(directory: Path) -> dict:
    """state.json of a checkpoint folder once every file its manifest lists is there with the right size and hash.

    Checkpoints written before manifests existed only need their model file.

    Raises:
        UserError: naming the file that is missing, truncated or corrupt.
    """
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise UserError(f"{directory}: incomplete checkpoint (no {STATE_FILE}: was it killed while being written?)")
    state = read_state(directory)
    files = state.get("files", {MODEL_FILE: None})  # plain names of files in the folder (checked by the schema)
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path}: missing from the checkpoint")
        if expected is None:
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise UserError(f"{path}: {size} bytes where {STATE_FILE} lists {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise UserError(f"{path}: contents differ from the SHA-256 in {STATE_FILE} (corrupt)")
    return state


def _newest_complete(candidates: Sequence[Path]) -> tuple[Path | None, list[str]]:
    """(the complete checkpoint with the highest step, earliest listed on a tie, or None; why others were skipped)."""
    complete, problems = [], []
    for order, folder in enumerate(candidates):
        if not folder.is_dir():
            continue
        try:
            state = verify_checkpoint(folder)
        except UserError as error:
            problems.append(str(error))
        else:
            complete.append((state.get("step") or 0, -order, folder))
    return (max(complete)[2] if complete else None), problems


def resolve_checkpoint(path: Path | str, prefer: tuple[str, ...] = ("best", "last")) -> Path:
    """The complete checkpoint folder meant by `path`: a checkpoint folder, a file inside one, or a run folder.

    For a run folder the first of `prefer` (sub-folders) holding a complete checkpoint is taken. A folder NAME stands
    for NAME, .NAME.old and .NAME.tmp (left by a kill during a save): the newest complete one of them is taken, and
    each incomplete or corrupt one skipped is logged as a warning.

    Raises:
        UserError: no complete checkpoint at `path`.
    """
    path = Path(path)
    if path.is_file() and path.name in (STATE_FILE, MODEL_FILE):
        path = path.parent
    groups = [[path / name, _variant(path / name, "old"), _variant(path / name, "tmp")] for name in prefer]
    if path.name.startswith(".") and path.name.endswith((".old", ".tmp")):  # a variant named explicitly
        groups.insert(0, [path])
    elif (path / STATE_FILE).exists() or (path / MODEL_FILE).exists() or not path.exists():
        groups.insert(0, [path, _variant(path, "old"), _variant(path, "tmp")])
    problems: list[str] = []
    for group in groups:
        found, skipped = _newest_complete(group)
        problems += skipped
        if found is not None:
            for problem in problems:
                log.warning("skipping a checkpoint: %s; using %s", problem, found)
            return found
    if problems:
        raise UserError(f"no complete checkpoint at {path}: " + "; ".join(problems))
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    raise UserError(f"{path}: not a checkpoint (no {STATE_FILE}) nor a run folder with {' or '.join(prefer)}/")


def read_state(directory: Path) -> dict:
    """state.json of a checkpoint folder, once its digest and schema check out (the files it lists are verified by
    `verify_checkpoint`). Its values have the types of `distill.checkpoint_schema.CheckpointState`.

    Raises:
        UserError: unreadable, edited (digest differs) or malformed (naming the field) state.
    """
    path = Path(directory) / STATE_FILE
    try:
        text = path.read_text()
        state = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable checkpoint state ({error})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: unreadable checkpoint state (a JSON object expected)")
    if STATE_DIGEST in state and state[STATE_DIGEST] != _state_digest(state):
        raise UserError(f"{path}: contents differ from the SHA-256 it records ({STATE_DIGEST}) (corrupt)")
    try:
        CheckpointState.model_validate_json(text)
    except ValidationError as error:
        raise UserError(f"{path}: {describe(error)}") from None
    return state


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load model.safetensors of a checkpoint folder into `model` (strict)."""
    try:
        load_model(model, str(Path(directory) / MODEL_FILE), strict=True)
    except (OSError, RuntimeError, SafetensorError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{directory / MODEL_FILE}: cannot load it into the model ({reason})") from None


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, state: Mapping[str, Any]) -> None:
    """Restore an optimizer saved by `save_checkpoint` (its param groups must match in order and size)."""
    path = Path(directory) / OPTIMIZER_FILE
    if "optimizer" not in state:
        raise UserError(f"{Path(directory) / STATE_FILE}: no optimizer state (a `best` checkpoint cannot be resumed)")
    try:
        saved = _join_tensors(state["optimizer"], _read_tensors(path))
        # JSON turned the state's int keys into strings and tuples (betas) into lists.
        saved["state"] = {int(index): value for index, value in saved["state"].items()}
        for group, current in zip(saved["param_groups"], optimizer.param_groups):
            group.update({k: tuple(v) for k, v in group.items() if isinstance(current.get(k), tuple)})
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: does not fit this run's optimizer ({error})") from None
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param in enumerate(params):  # load_state_dict checks no shapes
        for name, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                raise UserError(f"{path}: {name} of parameter {index} has shape {list(value.shape)}, the parameter "
                                f"{list(param.shape)}")  # fmt: skip


def load_method_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """method.safetensors of a checkpoint folder, or {} when the run had no extra method modules."""
    path = Path(directory) / METHOD_FILE
    return _read_tensors(path) if path.is_file() else {}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path}: cannot read the tensors ({str(error).splitlines()[0]})") from None


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


def restore_rng(state: Mapping[str, Any], origin: str = "rng") -> None:
    """Inverse of `capture_rng` (CUDA states only when this machine has as many devices), each state checked first.

    Raises:
        UserError: `origin` (where the state comes from) and the problem, for a state that this torch, numpy and
            python cannot take back (wrong type, size or contents); no generator has changed then.
    """
    try:  # the JSON schema, strictly, as state.json is read: the state is JSON-able by contract
        checked = RngState.model_validate_json(json.dumps(state))
    except ValidationError as error:
        raise UserError(f"{origin}: {describe(error)}") from None
    cuda = None
    if checked.cuda and torch.cuda.is_available() and len(checked.cuda) == torch.cuda.device_count():
        cuda = [_unb64(s) for s in checked.cuda]
        sizes = [current.numel() for current in torch.cuda.get_rng_state_all()]
        if [len(s) for s in cuda] != sizes:
            raise UserError(f"{origin}: CUDA states of {[len(s) for s in cuda]} bytes, this torch's have {sizes}")
    try:  # first: torch checks the words of its state (the schema checked its size)
        torch.set_rng_state(_unb64(checked.torch))
    except RuntimeError as error:
        raise UserError(f"{origin}.torch: {error}") from None
    version, internal, gauss = checked.python
    random.setstate((version, tuple(int(v) for v in _unb64(internal).numpy().view(np.uint32)), gauss))
    name, keys, pos, has_gauss, cached = checked.numpy
    np.random.set_state((name, _unb64(keys).numpy().view(np.uint32), pos, has_gauss, cached))
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _b64(tensor: torch.Tensor) -> str:
    """Raw bytes of a CPU tensor as base64 text."""
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    """Inverse of `_b64`, as a uint8 tensor (view the numpy array to get the original dtype back)."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
