"""Students (timm CNN + decoder + bins heads) and teachers (timm transformers, hybrid, HF, ONNX, precomputed).

Every built model carries `model.spec`, a JSON-able dict stored in checkpoints; `build_model(model.spec)` rebuilds
the same architecture (weights are loaded separately). Keys:

    kind            "student" | "teacher"
    student:
      arch                 timm CNN name, one of `STUDENTS.names()` (efficientnet_b0..b5, resnet18/34/50, ...)
      bins                 (int) K depth bins (256)
      min_depth, max_depth (float) metres, range of the bins (1e-3, 80.0)
      decoder_width        (int) channels of the decoder's fused features (128)
      output_stride        (int) stride of the decoder output where the heads predict (4; or 2)
      lgconv               (bool) wrap the encoder's 3x3 convs with LG-Conv (false)
      lgconv_heads         (int) LG-Conv heads M (4)
      lgconv_hidden_ratio  (float) LG-Conv hidden width / conv out channels (0.25)
    teacher:
      spec                 "timm:<name>" | "hybrid:<cnn>+<vit>" | "hf:<dir>" | "onnx:<file>" | "precomputed:<dir>"
      img_size             [H, W] pixels the teacher is built for
      bins, min_depth, max_depth, decoder_width, output_stride   as for students (trainable teachers)
      any further key      passed to the teacher (e.g. reassemble: false for plain ViTs)
Missing keys take the defaults in brackets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distill.errors import UserError
from distill.models.base import DepthModel
from distill.models.student import STUDENTS, StudentModel, build_student
from distill.models.teachers import TEACHERS, build_teacher

KIND_KEY = {"student": "arch", "teacher": "spec"}  # the key naming the architecture of each kind

__all__ = ["STUDENTS", "TEACHERS", "DepthModel", "StudentModel", "build_model", "build_student", "build_teacher"]


def build_model(spec: Mapping[str, Any]) -> DepthModel:
    """The model a spec dict describes (see the module docstring); bad specs raise UserError."""
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind not in KIND_KEY:
        raise UserError(f"model spec kind must be 'student' or 'teacher', got {kind!r}")
    if KIND_KEY[kind] not in params:
        raise UserError(f"model spec {dict(spec)} lacks the key {KIND_KEY[kind]!r}")
    name = params.pop(KIND_KEY[kind])
    try:
        return build_student(name, **params) if kind == "student" else build_teacher(name, **params)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise UserError(f"model spec {dict(spec)}: {error}") from None
