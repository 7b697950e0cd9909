"""`predict_depth`: a torch depth model on a batch of images, at the batch's resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.models.base import DepthModel


@torch.no_grad()
def predict_depth(model: DepthModel, image01: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Depth of a batch at the batch's resolution.

    Args:
        model: a depth model (eval mode is the caller's business).
        image01: (B, 3, H, W) RGB in [0, 1], on the model's device.
        size: (H, W) the model runs at (bilinear resize in and out); None runs at (H, W) with replicate padding up
            to multiples of `model.size_divisor` (cropped off again).

    Returns:
        (B, 1, H, W) float32 depth (metres for metric models).
    """
    height, width = image01.shape[-2:]
    if size is not None and tuple(size) != (height, width):
        resized = F.interpolate(image01, tuple(size), mode="bilinear", align_corners=False, antialias=True)
        depth = model(model.normalize(resized)).depth.float()
        return F.interpolate(depth, (height, width), mode="bilinear", align_corners=False)
    divisor = model.size_divisor
    pad_h, pad_w = -height % divisor, -width % divisor
    padded = F.pad(image01, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else image01
    return model(model.normalize(padded)).depth.float()[..., :height, :width]
