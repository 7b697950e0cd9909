"""Loading weights from files users bring (.safetensors, torch checkpoints) without ever running pickled code.

Torch checkpoints are read with `weights_only=True`: a file whose pickle names anything beyond tensors and plain
containers is refused, never executed. Common wrappers are unwrapped: {"state_dict": ...}, {"model": ...},
{"model_state_dict": ...}, and "module." (DataParallel/DDP) or "_orig_mod." (torch.compile) key prefixes.
"""

from __future__ import annotations

import argparse
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.errors import UserError

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# BatchNorm's batch counter only matters for momentum=None training; old checkpoints lack it.
IGNORED_MISSING_SUFFIX = "num_batches_tracked"
SHOWN_KEYS = 8


@dataclass
class LoadReport:
    """What `load_weights` did: tensor names loaded, and names only the model (missing) or file (unexpected) had."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        for label, keys in (("missing from the file", self.missing), ("not in the model", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label}: {_shorten(keys)}")
        return "; ".join(parts)


def _shorten(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor dict (on CPU) from a .safetensors file or a torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt headers
            raise UserError(f"{path}: cannot read the safetensors file ({error})") from None
    try:
        # timm training checkpoints keep their argparse.Namespace under "args": plain data, allowed as timm does.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message starts by suggesting weights_only=False; keep only the line naming the culprit.
        lines = [line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        culprit = f" ({lines[0].strip()})" if lines else ""
        raise UserError(
            f"{path}: refused to unpickle it: it holds objects other than tensors and plain containers, which could "
            f"run code{culprit}. Save only the state_dict, or convert it to .safetensors where you trust it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read the checkpoint ({error})") from None
    return unwrap_state_dict(checkpoint, path)


def unwrap_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint and strip wrapper prefixes from its keys."""
    while isinstance(checkpoint, dict):
        inner = next((checkpoint[k] for k in CONTAINER_KEYS if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            break
        checkpoint = inner
    tensors = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)} if isinstance(checkpoint, dict) else {}
    if not tensors:
        raise UserError(f"{path}: no tensors found (expected a state_dict, or one under {', '.join(CONTAINER_KEYS)})")
    state = {}
    for key, value in tensors.items():
        for prefix in STRIPPED_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def rename_prefixes(state: dict[str, torch.Tensor], prefix_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by prefix: the first `old` (in dict order) a key starts with becomes `new`; others are kept."""
    renamed = {}
    for key, value in state.items():
        old = next((old for old in prefix_map if key.startswith(old)), None)
        renamed[key if old is None else prefix_map[old] + key[len(old) :]] = value
    return renamed


def load_weights(
    model: nn.Module, path: str | Path, strict: bool = True, prefix_map: dict[str, str] | None = None
) -> LoadReport:
    """Load a weights file into `model`.

    Args:
        model: the module to fill, in place.
        path: .safetensors or torch checkpoint (.pt/.pth/.ckpt/.bin).
        strict: raise UserError when the file lacks some of the model's tensors or has tensors the model lacks;
            otherwise load the tensors whose names match and report the rest.
        prefix_map: old key prefix -> new prefix applied to the file's keys first, e.g. {"backbone.": "encoder."}.

    Returns:
        A `LoadReport`. Shape mismatches always raise UserError naming the key.
    """
    state = read_state_dict(path)
    if prefix_map:
        state = rename_prefixes(state, prefix_map)
    return assign_state(model, state, Path(path), strict)


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, strict: bool) -> LoadReport:
    """Copy `state` into `model` after checking names and shapes; `path` names the source in messages."""
    own = model.state_dict()
    mismatched = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise UserError(
            f"{path}: shape mismatch for {k!r}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
            + (f" (and {len(mismatched) - 1} more keys)" if len(mismatched) > 1 else "")
        )
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith(IGNORED_MISSING_SUFFIX))
    report = LoadReport(path, sorted(own.keys() & state.keys()), missing, sorted(state.keys() - own.keys()))
    if not report.loaded:
        raise UserError(f"{path}: none of its tensor names match the model ({report})")
    if strict and (report.missing or report.unexpected):
        raise UserError(f"{report}. Do the file and model match? (strict loading; prefix_map renames keys)")
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def _flat(key: str) -> str:
    return key.replace(".", "_")


def load_timm_encoder_weights(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Load ImageNet weights saved from a full timm classifier into its `features_only` encoder.

    timm's feature wrappers rename modules ("blocks.0" may become "blocks_0", ViT getters add "model.") and drop
    the classifier: keys are matched with '.' and '_' treated alike, the head's keys are reported as unexpected,
    and any encoder tensor the file lacks raises UserError before anything is loaded (wrong architecture).
    """
    state = read_state_dict(path)
    by_flat = {_flat(k): k for k in state}
    mapped, used = {}, set()
    for key in encoder.state_dict():
        source = by_flat.get(_flat(key)) or by_flat.get(_flat(key.removeprefix("model.")))
        if source is not None:
            mapped[key] = state[source]
            used.add(source)
    report = assign_state(encoder, mapped, Path(path), strict=True)
    report.unexpected = sorted(state.keys() - used)
    return report


def holds_encoder_weights(encoder: nn.Module, path: str | Path) -> bool:
    """Whether a weights file holds (nearly) every tensor of `encoder` under timm's names: a timm classifier's file
    given where a whole model's weights were expected."""
    by_flat = {_flat(k) for k in read_state_dict(path)}
    keys = [key for key in encoder.state_dict() if not key.endswith(IGNORED_MISSING_SUFFIX)]
    found = sum(_flat(key) in by_flat or _flat(key.removeprefix("model.")) in by_flat for key in keys)
    return bool(keys) and found >= 0.9 * len(keys)
