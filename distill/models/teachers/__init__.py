"""Teachers by spec, `<prefix>:<name>`: one file per prefix, each registering itself with the options it takes.

    timm:<name>            trainable timm ViT/Swin backbone + DepthHead                 timm.py
    hybrid:<cnn>+<vit>     trainable DPT-hybrid CNN+ViT + DepthHead                     hybrid.py
    hf:<folder>[?...]      a transformers depth model, run as it is                     hf.py
    onnx:<file>[?...]      a black-box ONNX model run with ONNX Runtime                 onnx.py
    precomputed:<dir>      depth maps cached as files (reader and writer)               precomputed.py

Options (a scheme's list: `TEACHERS.get(prefix).options`) follow "?" in file and folder specs, joined by "&", or
come as keywords to `build_teacher` (a checkpoint's stored spec); an unknown one is a UserError naming close
matches and the scheme's list. The spec grammar and the registry live in `_scheme.py`; a new teacher kind is one
new file registering itself with `register_teacher`, imported below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distill.errors import UserError
from distill.models.base import DepthModel
from distill.models.teachers import hf, hybrid, onnx, precomputed, timm  # noqa: F401  (each registers its scheme)
from distill.models.teachers._scheme import TEACHERS

__all__ = ["TEACHERS", "build_teacher"]


def build_teacher(
    spec: str,
    *,
    img_size: Sequence[int],
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    bins: int = 256,
    decoder_width: int = 128,
    output_stride: int = 4,
    **options: Any,
) -> DepthModel:
    """The teacher a spec names (see the module docstring), with `.spec` set to the dict that rebuilds it.

    Args:
        spec: "<prefix>:<name>"; prefixes: timm, hybrid, hf, onnx, precomputed.
        img_size: (H, W) pixels the teacher is built for.
        min_depth, max_depth: metres, the depth range (bins range for trainable teachers).
        bins, decoder_width, output_stride: `DepthHead` settings of trainable teachers.
        **options: the scheme's options (timm: reassemble, encoder_weights; hf: output_kind, size; ...); they
            override those after "?" in the spec.
    """
    prefix, colon, name = spec.partition(":")
    if not colon or not name:
        raise UserError(
            f"teacher spec {spec!r} must look like <prefix>:<name>; prefixes: {', '.join(TEACHERS.names())}"
        )
    scheme = TEACHERS.get(prefix)
    target, parsed = scheme.resolve(name, spec, options)
    head_kw = {
        "width": decoder_width,
        "output_stride": output_stride,
        "bins": bins,
        "min_depth": float(min_depth),
        "max_depth": float(max_depth),
    }
    model = scheme.build(target, img_size=img_size, head_kw=head_kw, **parsed)
    if getattr(model, "spec", None) is None:
        model.spec = {
            "kind": "teacher",
            "spec": spec,
            "img_size": [int(s) for s in img_size],
            "bins": bins,
            "min_depth": float(min_depth),
            "max_depth": float(max_depth),
            "decoder_width": decoder_width,
            "output_stride": output_stride,
            **{k: v for k, v in options.items() if k != "encoder_weights"},
        }
    return model
