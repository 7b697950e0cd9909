"""Depth models: students (timm CNN + decoder + bins heads), teachers (timm transformers, hybrid, HF, ONNX,
precomputed) and completion networks, and `load_model`, the one way to get any of them (see `distill.models.loading`).

Every built model carries `model.spec`, a JSON-able dict stored in checkpoints; `build_model(model.spec)` rebuilds
the same architecture (weights are loaded separately).
"""

from __future__ import annotations

from distill.models.base import DepthModel
from distill.models.loading import MODEL_KINDS, LoadedModel, build_model, load_model
from distill.models.student import STUDENTS, StudentModel, build_student
from distill.models.teachers import TEACHERS, build_teacher

__all__ = [
    "MODEL_KINDS",
    "STUDENTS",
    "TEACHERS",
    "DepthModel",
    "LoadedModel",
    "StudentModel",
    "build_model",
    "build_student",
    "build_teacher",
    "load_model",
]
