"""CNN students (DisDepth §3.1, methods §1): a timm CNN encoder's last four stages -> `DepthHead`.

The encoder is `timm.create_model(arch, features_only=True, out_indices=4)`; the decoder is sized from its
`feature_info`, so any registered arch works without channel tables. Optional LG-Conv wraps the encoder's 3x3 convs.
Exportable with `torch.onnx.export(..., opset_version=17, dynamo=False)` (no data-dependent control flow).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from distill.models.base import DepthModel, DepthOutput
from distill.models.decoder import DepthHead
from distill.models.lgconv import wrap_lgconv
from distill.models.timm_models import create_timm_model, timm_normalisation
from distill.registry import Registry

STUDENT_ARCHS = (
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "ghostnet_100",
)
STAGES = 4


class StudentModel(DepthModel):
    """timm CNN encoder + top-down decoder + AdaBins-style bins heads; metric depth in metres.

    Args:
        arch: timm name of the encoder (one of `STUDENTS.names()`).
        bins: K, number of depth bins.
        min_depth, max_depth: metres, the range the bins tile.
        decoder_width: channels of the decoder's fused features (32-64 for CPU, 128 default).
        output_stride: stride of the decoder output where the heads predict (4 or 2).
        lgconv: wrap the encoder's 3x3 convs with LG-Conv (DisDepth §3.2).
        lgconv_heads, lgconv_hidden_ratio: LG-Conv's M and hidden width ratio.
        encoder_weights: optional weights file of the full timm classifier (e.g. ImageNet), loaded into the encoder
            before the LG-Conv wrap. Not part of `spec`: a trained checkpoint carries all weights.
    """

    output_kind = "metric"

    def __init__(
        self,
        arch: str,
        *,
        bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 80.0,
        decoder_width: int = 128,
        output_stride: int = 4,
        lgconv: bool = False,
        lgconv_heads: int = 4,
        lgconv_hidden_ratio: float = 0.25,
        encoder_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.spec: dict[str, Any] = {
            "kind": "student",
            "arch": arch,
            "bins": bins,
            "min_depth": float(min_depth),
            "max_depth": float(max_depth),
            "decoder_width": decoder_width,
            "output_stride": output_stride,
            "lgconv": lgconv,
            "lgconv_heads": lgconv_heads,
            "lgconv_hidden_ratio": lgconv_hidden_ratio,
        }
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.encoder = create_timm_model(arch, features_only=True, out_indices=STAGES)
        if encoder_weights is not None:  # before the LG-Conv wrap, which renames the 3x3 convs' weights
            from distill.models.weights import load_timm_encoder_weights

            load_timm_encoder_weights(self.encoder, encoder_weights)
        self.mean, self.std = timm_normalisation(self.encoder)
        self.lgconv_count = wrap_lgconv(self.encoder, lgconv_heads, lgconv_hidden_ratio) if lgconv else 0
        self.size_divisor = max(self.feature_reductions())
        self.head = DepthHead(
            self.feature_channels(),
            self.feature_reductions(),
            width=decoder_width,
            output_stride=output_stride,
            bins=bins,
            min_depth=min_depth,
            max_depth=max_depth,
        )

    def feature_channels(self) -> list[int]:
        return list(self.encoder.feature_info.channels())

    def feature_reductions(self) -> list[int]:
        return list(self.encoder.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> DepthOutput:
        """(B, 3, H, W) normalised -> depth (B, 1, H, W) metres, probs (B, K, H/s, W/s), centers (B, K), 4 features."""
        return self.head(self.encoder(x), x.shape[-2:])


STUDENTS: Registry = Registry("student arch")
for _arch in STUDENT_ARCHS:
    STUDENTS.register(_arch, partial(StudentModel, _arch))


def build_student(arch: str, **kwargs: Any) -> StudentModel:
    """A `StudentModel` for a registered arch (unknown names raise UserError with close matches)."""
    return STUDENTS.get(arch)(**kwargs)
