"""LiDAR-guided metric depth (stage 2 of the two-stage completion of Gao et al., "Robust Lightweight Depth Estimation
Model via Data-Free Distillation"): robust scale/shift alignment of a predicted depth map to sparse LiDAR depth, and a
temporal prior that keeps the scale from flickering.

Pure numpy; no ROS, no torch. Sparse depth everywhere is (H, W) float32 metres along the optical axis with 0 (or a
non-finite value) where no LiDAR point landed; `geometry.lidar_to_depth` builds it from a scan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Space = Literal["depth", "inverse"]
Method = Literal["huber", "ransac"]

MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation under Gaussian noise
HUBER_K = 1.345  # Huber threshold in sigmas: 95 % efficiency of least squares under Gaussian noise
INLIER_SIGMAS = 3.0  # residuals beyond this many robust sigmas are outliers (occlusions, see-through, bad returns)
RANSAC_HYPOTHESES = 256  # P(no all-inlier pair) = 0.5 ** 256 even at 50 % outliers
RANSAC_SCORE_POINTS = 500  # hypotheses are scored on this random subset; the refit uses every point
HUBER_ITERATIONS = 10


@dataclass(frozen=True)
class Alignment:
    """Scale and shift mapping a prediction onto LiDAR depth (see `align_depth` for the two spaces).

    Attributes:
        scale, shift: s and t; s = 1, t = 0 when the alignment failed.
        space: "depth" (lidar ≈ s·pred + t) or "inverse" (1/lidar ≈ s·pred + t, pred a relative disparity).
        residual: RMS of (aligned depth − LiDAR depth) over the inliers, metres; NaN without a fit.
        inliers: number of LiDAR points within INLIER_SIGMAS robust sigmas of the fit.
        points: number of valid (prediction, LiDAR) pairs the fit saw.
        ok: whether scale and shift are usable as metric alignment (False: keep publishing relative depth).
        reason: one line saying how the values were obtained or why there are none.
        scale_only: the scale+shift fit gave s <= 0, so t was fixed at 0 and s refitted.
        from_prior: this frame had no usable fit; scale and shift are the temporal prior's recent values.
    """

    scale: float = 1.0
    shift: float = 0.0
    space: Space = "depth"
    residual: float = float("nan")
    inliers: int = 0
    points: int = 0
    ok: bool = False
    reason: str = ""
    scale_only: bool = False
    from_prior: bool = False


@dataclass
class AlignmentPrior:
    """Exponential smoothing of (s, t) across frames, so the metric scale does not flicker.

    Policy: the first good fit (or the first after a reset) is taken as is; each later good fit moves the state by
    (1 − momentum) towards it. A failed frame never updates the state: while the last good fit is at most
    `max_age` frames old the prior's values are returned with ok=True and from_prior=True; once it is older the
    prior resets (so a stale scale never blends into a new scene) and the failure is returned. A change of space
    also resets it.

    Attributes:
        momentum: weight of the past in [0, 1); 0 disables smoothing (but keeps the hold-over on failures).
        max_age: how many consecutive failed frames may reuse the last values.
        scale, shift, space: the smoothed state; scale is None until the first good fit.
        age: failed frames since the last good fit.
    """

    momentum: float = 0.9
    max_age: int = 10
    scale: float | None = None
    shift: float = 0.0
    space: Space | None = None
    age: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"AlignmentPrior momentum must be in [0, 1), got {self.momentum}")
        if self.max_age < 0:
            raise ValueError(f"AlignmentPrior max_age must be >= 0, got {self.max_age}")

    def reset(self) -> None:
        """Forget the state; the next good fit is taken as is."""
        self.scale, self.shift, self.space, self.age = None, 0.0, None, 0

    def update(self, fit: Alignment) -> Alignment:
        """Fold one frame's fit into the state and return the alignment to use for that frame."""
        if self.space is not None and fit.space != self.space:
            self.reset()
        if fit.ok:
            if self.scale is None:
                self.scale, self.shift = fit.scale, fit.shift
            else:
                keep = self.momentum
                self.scale = keep * self.scale + (1.0 - keep) * fit.scale
                self.shift = keep * self.shift + (1.0 - keep) * fit.shift
            self.space, self.age = fit.space, 0
            return replace(fit, scale=self.scale, shift=self.shift, reason=f"{fit.reason}, temporally smoothed")
        self.age += 1
        if self.scale is None or self.age > self.max_age:
            self.reset()
            return fit
        return replace(
            fit,
            scale=self.scale,
            shift=self.shift,
            ok=True,
            from_prior=True,
            reason=f"{fit.reason}; using the prior from {self.age} frame(s) ago",
        )


def align_depth(
    pred: np.ndarray,
    sparse: np.ndarray,
    *,
    space: Space = "depth",
    method: Method = "huber",
    min_points: int = 20,
    prior: AlignmentPrior | None = None,
    seed: int = 0,
) -> Alignment:
    """Fit scale s and shift t between a prediction and sparse LiDAR depth, robustly, in closed form.

    Spaces: "depth" expects `pred` to be depth up to an affine map (a metric or relative-depth model) and fits
    lidar ≈ s·pred + t in metres; "inverse" expects `pred` to be a relative disparity (larger = nearer, as MiDaS /
    Depth Anything output) and fits 1/lidar ≈ s·pred + t in 1/metres. Methods: "huber" runs IRLS with Huber
    weights (scale by MAD) from the least-squares start; "ransac" draws point pairs (seeded, deterministic) and keeps
    the hypothesis with the least median residual (no threshold to tune). Either way the outliers beyond
    INLIER_SIGMAS robust sigmas are then dropped and s, t refitted by least squares on the inliers. If s <= 0 the fit
    is redone with t = 0 (scale only) and says so.

    Args:
        pred: (H, W) prediction as described above; non-finite pixels are ignored.
        sparse: (H, W) float32 LiDAR depth, metres, 0 or non-finite = no point.
        space, method: see above.
        min_points: fewer valid pairs than this give ok=False (at least 2).
        prior: temporal state updated with this frame (see `AlignmentPrior` for the policy), or None.
        seed: RANSAC sampling seed.

    Returns:
        The Alignment; on failure ok=False, s = 1, t = 0 and reason "no alignment: N valid points ...".
    """
    pred, sparse = np.asarray(pred), np.asarray(sparse)
    if pred.shape != sparse.shape or pred.ndim != 2:
        raise ValueError(f"pred and sparse must be (H, W) of one shape, got {pred.shape} and {sparse.shape}")
    if space not in ("depth", "inverse") or method not in ("huber", "ransac"):
        raise ValueError(f"unknown space {space!r} or method {method!r}: expected depth|inverse and huber|ransac")
    if min_points < 2:
        raise ValueError(f"min_points must be >= 2 (two unknowns), got {min_points}")
    valid = np.isfinite(pred) & np.isfinite(sparse) & (sparse > 0)
    x, lidar = pred[valid].astype(np.float64), sparse[valid].astype(np.float64)
    fit, inliers = _fit_pairs(x, lidar, space, method, min_points, seed)
    if prior is None:
        return fit
    result = prior.update(fit)
    if inliers is not None:
        result = replace(result, residual=_inlier_rms(x, lidar, result.scale, result.shift, space, inliers))
    return result


def apply_alignment(pred: np.ndarray, alignment: Alignment) -> np.ndarray:
    """Aligned depth: s·pred + t ("depth") or 1/(s·pred + t) ("inverse").

    Args:
        pred: (H, W) the prediction the alignment was fitted on (depth or relative disparity).
        alignment: from `align_depth`. Check `ok` first: a failed one (s = 1, t = 0) gives back the prediction
            (depth space) or its reciprocal (inverse space), still relative.

    Returns:
        (H, W) float32 metres; NaN where the aligned depth (or disparity) is not positive or pred was not finite.
    """
    pred = np.asarray(pred, dtype=np.float32)
    return _apply(pred, alignment.scale, alignment.shift, alignment.space).astype(np.float32, copy=False)


def _apply(x: np.ndarray, scale: float, shift: float, space: Space) -> np.ndarray:
    """s·x + t or 1/(s·x + t) in the dtype of x, NaN where not positive."""
    value = scale * x + shift
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = value > 0
        if space == "inverse":
            value = 1.0 / value
        return np.where(positive, value, np.nan)


def _fit_pairs(
    x: np.ndarray, lidar: np.ndarray, space: Space, method: Method, min_points: int, seed: int
) -> tuple[Alignment, np.ndarray | None]:
    """The alignment of valid pairs (pred value, LiDAR metres) and its inlier mask (None on failure)."""
    count = len(lidar)
    if count < min_points:
        return _failed(space, count, f"no alignment: {count} valid points (need {min_points})"), None
    y = lidar if space == "depth" else 1.0 / lidar
    rng = np.random.default_rng(seed)
    scale, shift, inliers = _robust_line(x, y, method, with_shift=True, rng=rng)
    if np.isnan(scale):
        return _failed(space, count, f"no alignment: the prediction is constant over the {count} LiDAR points"), None
    reason = f"{method} scale+shift fit"
    scale_only = not scale > 0
    if scale_only:
        reason = f"{method} scale-only fallback (scale+shift fit gave s = {scale:.3g})"
        scale, shift, inliers = _robust_line(x, y, method, with_shift=False, rng=rng)
    if not scale > 0:
        return _failed(space, count, f"no alignment: non-positive scale {scale:.3g} even with t = 0"), None
    residual = _inlier_rms(x, lidar, scale, shift, space, inliers)
    alignment = Alignment(scale, shift, space, residual, int(inliers.sum()), count, True, reason, scale_only)
    return alignment, inliers


def _failed(space: Space, count: int, reason: str) -> Alignment:
    return Alignment(space=space, points=count, reason=reason)


def _inlier_rms(
    x: np.ndarray, lidar: np.ndarray, scale: float, shift: float, space: Space, inliers: np.ndarray
) -> float:
    """RMS in metres of aligned depth − LiDAR depth over the inliers (NaN aligned values skipped)."""
    error = _apply(x[inliers], scale, shift, space) - lidar[inliers]
    error = error[np.isfinite(error)]
    return float(np.sqrt(np.mean(error**2))) if error.size else float("nan")


def _robust_line(
    x: np.ndarray, y: np.ndarray, method: Method, with_shift: bool, rng: np.random.Generator
) -> tuple[float, float, np.ndarray]:
    """y ≈ s·x + t (t = 0 unless with_shift): robust start, then least squares on the inliers, twice."""
    if method == "huber":
        scale, shift = _huber_line(x, y, with_shift)
    else:
        scale, shift = _ransac_line(x, y, with_shift, rng)
    inliers = np.ones(len(x), dtype=bool)
    for _ in range(2):
        if not np.isfinite(scale):
            break
        residual = np.abs(y - (scale * x + shift))
        inliers = residual <= INLIER_SIGMAS * _robust_sigma(residual, y)
        scale, shift = _weighted_line(x, y, inliers.astype(np.float64), with_shift)
    return scale, shift, inliers


def _robust_sigma(abs_residual: np.ndarray, y: np.ndarray) -> float:
    """Noise sigma from the median absolute residual, floored so exact data keeps its (rounding-level) inliers."""
    floor = 1e-9 * float(np.max(np.abs(y)))
    return max(MAD_TO_SIGMA * float(np.median(abs_residual)), floor, np.finfo(np.float64).tiny)


def _weighted_line(x: np.ndarray, y: np.ndarray, w: np.ndarray, with_shift: bool) -> tuple[float, float]:
    """Closed-form weighted least squares (the 2x2 normal equations, centred for accuracy); NaN if degenerate.

    Sums are elementwise on purpose: np.dot goes through multithreaded BLAS, which on a busy robot CPU costs
    tens of milliseconds for vectors this short.
    """
    total = float(w.sum())
    if total <= 0:
        return float("nan"), 0.0
    if not with_shift:
        sxx = float((w * x * x).sum())
        return (float((w * x * y).sum()) / sxx if sxx > 0 else float("nan")), 0.0
    x_mean, y_mean = float((w * x).sum()) / total, float((w * y).sum()) / total
    dx = x - x_mean
    sxx = float((w * dx * dx).sum())
    if sxx <= 1e-12 * total * max(x_mean * x_mean, 1e-300):  # prediction constant over the points
        return float("nan"), 0.0
    scale = float((w * dx * (y - y_mean)).sum()) / sxx
    return scale, y_mean - scale * x_mean


def _huber_line(x: np.ndarray, y: np.ndarray, with_shift: bool) -> tuple[float, float]:
    """IRLS with Huber weights, sigma re-estimated by MAD each iteration."""
    weights = np.ones_like(x)
    scale, shift = _weighted_line(x, y, weights, with_shift)
    for _ in range(HUBER_ITERATIONS):
        if not np.isfinite(scale):
            break
        residual = np.abs(y - (scale * x + shift))
        threshold = HUBER_K * _robust_sigma(residual, y)
        weights = threshold / np.maximum(residual, threshold)  # 1 inside the threshold, k/|r| beyond
        new_scale, new_shift = _weighted_line(x, y, weights, with_shift)
        converged = abs(new_scale - scale) <= 1e-9 * abs(scale) and abs(new_shift - shift) <= 1e-9 * (abs(shift) + 1)
        scale, shift = new_scale, new_shift
        if converged:
            break
    return scale, shift


def _ransac_line(x: np.ndarray, y: np.ndarray, with_shift: bool, rng: np.random.Generator) -> tuple[float, float]:
    """Minimal-sample hypotheses (pairs, or single points for scale only) scored by their median |residual|."""
    count = len(x)
    first = rng.integers(0, count, RANSAC_HYPOTHESES)
    with np.errstate(divide="ignore", invalid="ignore"):
        if with_shift:
            second = rng.integers(0, count, RANSAC_HYPOTHESES)
            scales = (y[second] - y[first]) / (x[second] - x[first])
            shifts = y[first] - scales * x[first]
        else:
            scales, shifts = y[first] / x[first], np.zeros(RANSAC_HYPOTHESES)
    usable = np.isfinite(scales) & np.isfinite(shifts)
    if not usable.any():
        return float("nan"), 0.0
    scales, shifts = scales[usable], shifts[usable]
    scored = rng.choice(count, min(count, RANSAC_SCORE_POINTS), replace=False)
    residual = np.abs(y[scored][None, :] - (scales[:, None] * x[scored][None, :] + shifts[:, None]))
    best = int(np.argmin(np.median(residual, axis=1)))
    return float(scales[best]), float(shifts[best])
