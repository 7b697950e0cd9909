"""Teacher outputs in metres: per-image least-squares alignment of relative outputs, and the rows KD ignores.

Relative teachers (`relative_depth`, `relative_disparity`) are aligned per image with a closed-form least-squares
scale and shift (disparities in inverse-depth space, MiDaS-style: Ranftl et al., "Towards Robust Monocular Depth
Estimation", TPAMI 2022, §5) to a reference: the student's detached prediction (label-free) or the ground truth
where the method is told to use it. Metric teachers are used as they are. Pure torch maths: batched, masked,
differentiable.
"""

from __future__ import annotations

from typing import Literal

import torch

MIN_FIT_PIXELS = 2  # fewer reference pixels than this and the fit is the identity (scale 1, shift 0)


def fit_scale_shift(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image least-squares (s, t) minimising sum over mask of (s * x + t - y)^2, in closed form.

    Same fit as `distill.metrics.align_prediction(..., "lsq")` (numpy, one image), batched and masked in torch. A
    constant x fixes only the shift (s = 0, t = mean y); an image with fewer than 2 masked pixels gets (1, 0).

    Args:
        x: (B, 1, H, W) values to align (any units).
        y: (B, 1, H, W) reference values.
        mask: (B, 1, H, W) bool, pixels that count (x and y finite there).

    Returns:
        scale (B,), shift (B,), in y's units per x unit and y's units.
    """
    w = mask.to(x.dtype).flatten(1)
    x, y = torch.where(mask, x, 0.0).flatten(1), torch.where(mask, y, 0.0).flatten(1)
    count = w.sum(dim=1)
    n = count.clamp_min(1.0)
    x_mean, y_mean = (w * x).sum(1) / n, (w * y).sum(1) / n
    dx, dy = (x - x_mean[:, None]) * w, (y - y_mean[:, None]) * w
    var, cov = (dx * dx).sum(1), (dx * dy).sum(1)
    scale = torch.where(var > 0, cov / var.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(var))
    shift = y_mean - scale * x_mean
    enough = count >= MIN_FIT_PIXELS
    return torch.where(enough, scale, torch.ones_like(scale)), torch.where(enough, shift, torch.zeros_like(shift))


def align_to_reference(
    output: torch.Tensor,
    kind: Literal["metric", "relative_depth", "relative_disparity"],
    reference: torch.Tensor,
    mask: torch.Tensor,
    depth_range: tuple[float, float],
) -> torch.Tensor:
    """A teacher output as depth in the reference's units, clamped to `depth_range`.

    Args:
        output: (B, 1, H, W) teacher output: metres ("metric"), relative depth or relative disparity.
        kind: the teacher's output kind.
        reference: (B, 1, H, W) depth the relative output is fitted to (metres, > 0 where mask).
        mask: (B, 1, H, W) bool, pixels used for the fit.
        depth_range: (min, max) metres of the result.

    Returns:
        (B, 1, H, W) depth. Relative depth: s * output + t fitted to the reference; relative disparity:
        1 / (s * output + t) with s, t fitted to 1 / reference (inverse depth floored at 1 / max).
    """
    low, high = depth_range
    if kind == "relative_depth":
        scale, shift = fit_scale_shift(output, reference, mask)
        output = scale.view(-1, 1, 1, 1) * output + shift.view(-1, 1, 1, 1)
    elif kind == "relative_disparity":
        inverse = 1.0 / reference.clamp_min(low)
        scale, shift = fit_scale_shift(output, inverse, mask)
        output = 1.0 / (scale.view(-1, 1, 1, 1) * output + shift.view(-1, 1, 1, 1)).clamp_min(1.0 / high)
    return output.clamp(low, high)


def top_rows_mask(like: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, 1, H, W) bool, False on the top round(fraction * H) rows (TIE-KD ignores 110 of 352 = 0.3125 on KITTI)."""
    mask = torch.ones_like(like, dtype=torch.bool)
    mask[..., : round(fraction * like.shape[-2]), :] = False
    return mask
