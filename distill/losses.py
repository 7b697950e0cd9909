"""Task and response losses shared by every training recipe: SILog, bins chamfer, SSIM, MSE, scale-invariant.

All functions are pure and differentiable, take (B, 1, H, W) depth maps in metres (float32) and an optional
(B, 1, H, W) bool mask of pixels that count, and return a scalar tensor. Values at masked-out pixels never change
the result (they may even be NaN). Predictions at a coarser resolution must be resized by the caller first.
A loss with no valid pixel at all returns 0 while keeping the graph, so a batch of unlabelled images is harmless.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_LOG_DEPTH = 1e-3  # metres: depths are clamped to this before a log, so an early all-zero output stays finite


def _select(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N,) values of pred and target where valid (all pixels when valid is None)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if valid is None:
        return pred.flatten(), target.flatten()
    if valid.shape != pred.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} differs from pred shape {tuple(pred.shape)}")
    return pred[valid], target[valid]


def _zero(pred: torch.Tensor) -> torch.Tensor:
    """A zero loss connected to pred's graph (NaN-free even if pred holds NaN at masked pixels)."""
    return torch.nan_to_num(pred).sum() * 0.0


def _log_error(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(N,) g = ln pred - ln target over valid pixels with target > 0, both clamped to >= MIN_LOG_DEPTH."""
    pred_v, target_v = _select(pred, target, valid)
    keep = target_v > 0
    pred_v, target_v = pred_v[keep], target_v[keep]
    return torch.log(pred_v.clamp_min(MIN_LOG_DEPTH)) - torch.log(target_v.clamp_min(MIN_LOG_DEPTH))


def silog_loss(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha: float = 10.0,
    lam: float = 0.85,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Scale-invariant log loss of AdaBins / DisDepth: alpha * sqrt(mean(g^2) - lam * mean(g)^2), g = ln pred - ln gt.

    The means run over all valid pixels of the whole batch at once (as AdaBins' ``SILogLoss``), not per image.
    lam = 1 makes it fully scale invariant; lam = 0.85 keeps a 0.15 share of the global scale error.
    D is computed as var(g) + (1 - lam) * mean(g)^2 (same value, no float32 cancellation), and
    sqrt(max(D, 0) + eps) keeps the gradient finite when the fit is perfect (the loss is then alpha * sqrt(eps)).

    Args:
        pred: (B, 1, H, W) predicted depth, metres (clamped to >= 1e-3 before the log).
        gt: (B, 1, H, W) ground-truth depth, metres; pixels with gt <= 0 are ignored.
        valid: (B, 1, H, W) bool, pixels with a label; None = every pixel with gt > 0.
        alpha: output scale (10 in the papers).
        lam: variance-focus weight lambda (0.85 in the papers).
        eps: added under the square root, in squared log units.

    Returns:
        Scalar loss (dimensionless).
    """
    g = _log_error(pred, gt, valid)
    if g.numel() == 0:
        return _zero(pred)
    return alpha * torch.sqrt(_log_variance_form(g, lam).clamp_min(0.0) + eps)


def scale_invariant_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen et al. (2014) scale-invariant error, the "SI" response-KD baseline: mean(g^2) - 0.5 * mean(g)^2.

    g = ln pred - ln target. lambda = 0.5 is Eigen's training value and there is no square root or alpha, unlike
    `silog_loss` (the 0.85 AdaBins variant), so the two are distinct terms in an experiment config.

    Args:
        pred: (B, 1, H, W) student depth, metres.
        target: (B, 1, H, W) teacher (or ground-truth) depth, metres; pixels with target <= 0 are ignored.
        valid: (B, 1, H, W) bool or None (all pixels).

    Returns:
        Scalar loss, squared log units.
    """
    g = _log_error(pred, target, valid)
    if g.numel() == 0:
        return _zero(pred)
    return _log_variance_form(g, 0.5)


def _log_variance_form(g: torch.Tensor, lam: float) -> torch.Tensor:
    """mean(g^2) - lam * mean(g)^2 written as var(g) + (1 - lam) * mean(g)^2.

    The two-pass variance avoids the float32 cancellation of the one-pass form, which for lam = 1 and a pure scale
    error (g constant) leaves ~1e-7 * g^2 of noise, i.e. a SILog of ~5e-3 instead of 0 once square-rooted.
    """
    mean = g.mean()
    return torch.mean((g - mean) ** 2) + (1.0 - lam) * mean**2


def mse_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared depth error over valid pixels.

    Args:
        pred: (B, 1, H, W) student depth, metres.
        target: (B, 1, H, W) teacher (or ground-truth) depth, metres.
        valid: (B, 1, H, W) bool or None (all pixels).

    Returns:
        Scalar loss, square metres.
    """
    pred_v, target_v = _select(pred, target, valid)
    if pred_v.numel() == 0:
        return _zero(pred)
    return torch.mean((pred_v - target_v) ** 2)


def bins_chamfer_loss(centers: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """AdaBins' bidirectional chamfer loss between the bin centres and the valid ground-truth depths of each image.

    Per image: mean over GT depths of the squared distance to the nearest centre, plus the mean over centres of the
    squared distance to the nearest GT depth (pytorch3d ``chamfer_distance`` defaults, as the AdaBins code); then the
    mean over images that have a valid pixel. Depths are 1-D points, so nearest neighbours come exactly from sorting
    and ``searchsorted`` in O((N + K) log N) time and O(N + K) memory: no N x K distance matrix and no subsampling of
    the GT points is needed even for dense NYU labels. The caller applies the weight (0.1 in the papers).

    Args:
        centers: (B, K) bin centres, metres (any order).
        gt: (B, 1, H, W) ground-truth depth, metres.
        valid: (B, 1, H, W) bool, labelled pixels; None = gt > 0.

    Returns:
        Scalar loss, square metres (gradient flows to `centers` only).
    """
    if valid is None:
        valid = gt > 0
    per_image = []
    for centers_b, gt_b, valid_b in zip(centers, gt, valid):
        points = gt_b[valid_b].detach()
        if points.numel() == 0:
            continue
        per_image.append(_nearest_sq_dist(points, centers_b).mean() + _nearest_sq_dist(centers_b, points).mean())
    if not per_image:
        return _zero(centers)
    return torch.stack(per_image).mean()


def _nearest_sq_dist(queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(Q,) squared distance from each 1-D query to its nearest value in points (P,), P >= 1."""
    sorted_points = torch.sort(points).values
    upper = torch.searchsorted(sorted_points.detach(), queries.detach().contiguous()).clamp_max(len(points) - 1)
    lower = (upper - 1).clamp_min(0)
    return torch.minimum((queries - sorted_points[lower]) ** 2, (queries - sorted_points[upper]) ** 2)


def _gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    """(size, size) normalised Gaussian kernel."""
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 11,
    mask: torch.Tensor | None = None,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) of two single-channel maps over the (masked) pixels.

    Follows the TIE-KD code's convention: Gaussian window (sigma = 1.5 px, 11x11 by default),
    C1 = (0.01 * L)^2 and C2 = (0.03 * L)^2 with L = `data_range`. Depth should be normalised first (divide by
    the max depth, as `ssim_loss` does) so that L = 1 is the real range; TIE-KD feeds metres with L = 1, which makes
    the constants negligible. Two deliberate differences from that code: local statistics are masked, normalised
    window averages (only valid pixels inside each window count, which also replaces zero padding at the image
    border), and the covariance keeps its sign (TIE-KD takes abs(), rewarding anti-correlated structure).

    Args:
        x: (B, 1, H, W) first map, e.g. depth / max_depth.
        y: (B, 1, H, W) second map, same units.
        window: odd window side in pixels (7 or 11 are usual).
        mask: (B, 1, H, W) bool, pixels whose values and SSIM count; None = all pixels.
        data_range: L, the dynamic range of x and y.

    Returns:
        Scalar float32 mean SSIM in [-1, 1] over the masked pixels (1 when x == y, and when no pixel is valid, so
        that `ssim_loss` is then 0). Computed in float32 with autocast off, whatever the inputs' dtype.
    """
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"ssim expects two (B, 1, H, W) maps, got {tuple(x.shape)} and {tuple(y.shape)}")
    if window < 3 or window % 2 == 0:
        raise ValueError(f"ssim window must be an odd size >= 3, got {window}")
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    if not m.any():
        return _zero(x) + 1.0
    with torch.autocast(x.device.type, enabled=False):  # window sums of squares need float32 even under AMP
        return _masked_ssim(x.float(), y.float(), m, window, data_range)


def _masked_ssim(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, window: int, data_range: float) -> torch.Tensor:
    w = m.to(x.dtype)
    x, y = torch.where(m, x, 0.0), torch.where(m, y, 0.0)
    stack = torch.cat([w, x, y, x * x, y * y, x * y], dim=1)
    kernel = _gaussian_window(window).to(x).expand(6, 1, window, window)
    sums = F.conv2d(stack, kernel, padding=window // 2, groups=6)
    weight = sums[:, :1].clamp_min(1e-12)  # > 0 at every valid pixel: the window's centre weighs > 0
    mu_x, mu_y, e_xx, e_yy, e_xy = (sums[:, 1:] / weight).unbind(dim=1)
    var_x = (e_xx - mu_x**2).clamp_min(0.0)
    var_y = (e_yy - mu_y**2).clamp_min(0.0)
    cov = e_xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map[m[:, 0]].mean()


def ssim_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    max_depth: float = 80.0,
    window: int = 11,
) -> torch.Tensor:
    """1 - SSIM between two depth maps, each divided by `max_depth` first (so SSIM's constants suit [0, 1]).

    Args:
        pred: (B, 1, H, W) student depth, metres.
        target: (B, 1, H, W) teacher depth, metres.
        valid: (B, 1, H, W) bool or None (all pixels).
        max_depth: normalisation depth, metres (80 KITTI, 10 NYU).
        window: SSIM window side, pixels.

    Returns:
        Scalar loss in [0, 2], dimensionless.
    """
    if not math.isfinite(max_depth) or max_depth <= 0:
        raise ValueError(f"max_depth must be a positive number of metres, got {max_depth}")
    return 1.0 - ssim(pred / max_depth, target / max_depth, window=window, mask=valid)
