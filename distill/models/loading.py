"""The one way to get a model: `load_model(ref)` for students, teachers and completion networks.

A ref is any of
    - a spec dict, as stored in checkpoints (`model.spec`): {"kind": "student"|"teacher"|"completion", ...};
    - a checkpoint folder, a run folder (its best/, else last/), or a file inside a checkpoint folder: the model its
      state.json describes, with the trained weights, and the run's resolved config;
    - a teacher spec "<scheme>:<name>" (timm:, hybrid:, hf:, onnx:, precomputed:; see `distill.models.teachers`);
    - a student arch name (efficientnet_b0, resnet18, ...; `STUDENTS.names()`).
`weights` loads a trained model's tensors into what a name or spec builds: a checkpoint folder (strict) or a weights
file (.safetensors, .pth, ...). Each model kind is one entry of `MODEL_KINDS`; a new kind registers its builder there.

Spec keys of each kind:
    student     arch, bins (256), min_depth/max_depth metres (1e-3, 80.0), decoder_width (128), output_stride (4 or
                2), lgconv (false), lgconv_heads (4), lgconv_hidden_ratio (0.25), encoder_weights (a timm file)
    teacher     spec ("timm:<name>", ...), img_size [H, W] pixels, and the head keys of students (trainable teachers);
                any further key is passed to the teacher (e.g. reassemble: false for plain ViTs)
    completion  widths, output_stride (1 or 2), min_depth/max_depth metres, lidar_gate (see models/completion.py)
Missing keys take the defaults in brackets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from distill import checkpoint as ckpt
from distill.data.kitti import KB_CROP
from distill.errors import UserError
from distill.models.base import DepthModel
from distill.models.completion import KIND as COMPLETION_KIND
from distill.models.completion import build_completion
from distill.models.student import build_student
from distill.models.teachers import build_teacher
from distill.models.weights import holds_encoder_weights, load_weights
from distill.registry import Registry

TEACHER_SPEC = re.compile(r"^[a-z_]+:")  # "timm:...", "hybrid:...", "hf:<folder>", "onnx:<file>", ...

MODEL_KINDS: Registry[Callable[[dict[str, Any]], DepthModel]] = Registry("model kind")


@MODEL_KINDS.register("student")
def _student(params: dict[str, Any]) -> DepthModel:
    return build_student(_pop_name(params, "arch"), **params)


@MODEL_KINDS.register("teacher")
def _teacher(params: dict[str, Any]) -> DepthModel:
    return build_teacher(_pop_name(params, "spec"), **params)


@MODEL_KINDS.register(COMPLETION_KIND)
def _completion(params: dict[str, Any]) -> DepthModel:
    return build_completion({"kind": COMPLETION_KIND, **params})


def _pop_name(params: dict[str, Any], key: str) -> str:
    if key not in params:
        raise UserError(f"model spec {params} lacks the key {key!r}")
    return params.pop(key)


class LoadedModel(NamedTuple):
    """What `load_model` returns: the model (eval mode, on the device) and the resolved config of the run that
    trained it ({} for a model built from a name or spec)."""

    model: DepthModel
    config: dict


def build_model(spec: Mapping[str, Any]) -> DepthModel:
    """The (untrained) model a spec dict describes; bad specs raise UserError."""
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind not in MODEL_KINDS:
        raise UserError(f"model spec kind must be one of {', '.join(MODEL_KINDS.names())}, got {kind!r}")
    try:
        return MODEL_KINDS.get(kind)(params)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise UserError(f"model spec {dict(spec)}: {error}") from None


def load_model(
    ref: Mapping[str, Any] | str | Path,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    img_size: tuple[int, int] | None = None,
    **build_kw: Any,
) -> LoadedModel:
    """The model `ref` names (see the module docstring), in eval mode on `device`.

    Args:
        ref: spec dict, checkpoint/run folder (or a file in one), teacher spec or student arch name.
        weights: checkpoint folder or weights file loaded (strictly) into the model a name or spec builds.
        device: where the model goes.
        img_size: (H, W) pixels a teacher is built for (students and checkpoints ignore it; default KITTI's
            352x1216 KB crop, and trainable teachers adapt to other sizes anyway).
        **build_kw: builder keywords for a name: the spec keys of its kind (bins, min_depth, decoder_width, ...).

    Raises:
        UserError: unknown name, missing or incomplete checkpoint, weights that do not fit.
    """
    config: dict = {}
    if isinstance(ref, Mapping):
        model = build_model(ref)
    elif _is_checkpoint_ref(ref):
        if build_kw:
            raise UserError(f"{ref}: a checkpoint carries its own architecture; build options {sorted(build_kw)} apply "
                            "to names only")  # fmt: skip
        model, config = _from_checkpoint(Path(ref))
    elif TEACHER_SPEC.match(str(ref)):
        model = build_teacher(str(ref), img_size=img_size or KB_CROP, **build_kw)
    else:
        model = build_student(str(ref), **build_kw)
    if weights is not None:
        load_weights_into(model, Path(weights))
    return LoadedModel(model.to(device).eval(), config)


def _is_checkpoint_ref(ref: str | Path) -> bool:
    """Whether `ref` is meant as a path (it exists, or looks like one) rather than a name or a teacher spec."""
    text = str(ref)
    if isinstance(ref, Path) or Path(text).exists():
        return True
    if TEACHER_SPEC.match(text):
        return False
    if "/" in text or Path(text).suffix:
        raise UserError(f"{text}: no such checkpoint file or folder")
    return False


def _from_checkpoint(path: Path) -> tuple[DepthModel, dict]:
    """The trained model of a checkpoint (folder, run folder, or a file in one) and its run's resolved config."""
    directory = ckpt.resolve_checkpoint(path)
    state = ckpt.read_state(directory)
    spec = state.get("model")  # a dict or None: read_state checked the schema (distill/checkpoint_schema.py)
    if not spec:
        raise UserError(f"{directory / ckpt.STATE_FILE}: no model spec, cannot rebuild the model")
    try:
        model = build_model(spec)
    except (UserError, TypeError, ValueError, RuntimeError) as error:  # values of an edited spec reach the builders
        raise UserError(f"{directory / ckpt.STATE_FILE}: model: {str(error).splitlines()[0]}") from None
    ckpt.load_model_weights(model, directory)
    return model, state.get("config") or {}


def load_weights_into(model: DepthModel, weights: Path) -> None:
    """Load a checkpoint folder's model tensors, or a weights file, into `model` (strict)."""
    if weights.is_dir() or weights.name == ckpt.STATE_FILE:
        ckpt.load_model_weights(model, ckpt.resolve_checkpoint(weights))
    else:
        try:
            load_weights(model, weights)
        except UserError:
            encoder = getattr(model, "encoder", None) or getattr(model, "backbone", None)
            if isinstance(encoder, torch.nn.Module) and holds_encoder_weights(encoder, weights):
                raise UserError(
                    f"{weights}: holds timm weights of the encoder only, not of the whole depth model: give it as "
                    "encoder_weights (config: model.encoder_weights); model.weights takes a trained checkpoint"
                ) from None
            raise
