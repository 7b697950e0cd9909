"""LiDAR alignment (depth_node.alignment) and IP-Basic fill (depth_node.completion): exact recovery, outliers, the
scale-only fallback, failures that must not raise, the temporal prior, and the fill on a synthetic 64-beam scan and
on the real KITTI frame against its official annotated ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from depth_node.alignment import Alignment, AlignmentPrior, align_depth, apply_alignment
from depth_node.completion import ip_basic_fill
from depth_node.geometry import lidar_to_depth as project_lidar

KITTI = Path("kitti_raw_sample")
DRIVE = KITTI / "2011_09_26" / "2011_09_26_drive_0001_sync"
KITTI_GT = KITTI / "data_depth_annotated/train/2011_09_26_drive_0001_sync/proj_depth/groundtruth/image_02"
METHODS = ["huber", "ransac"]


def _relation(shape=(60, 80), density=0.1, seed=0):
    """A smooth positive prediction map and a random LiDAR sampling mask over it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    pred = (1.0 + rows / shape[0] + 0.5 * np.sin(cols / 9.0) ** 2).astype(np.float32)
    return pred, rng.random(shape) < density, rng


def _sparse(mask: np.ndarray, depth: np.ndarray) -> np.ndarray:
    return np.where(mask, depth, 0.0).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_exact_scale_and_shift_are_recovered_in_depth_space(method):
    pred, mask, _ = _relation()
    fit = align_depth(pred, _sparse(mask, 2.5 * pred + 1.25), method=method)
    assert fit.ok and not fit.scale_only and fit.space == "depth"
    assert fit.scale == pytest.approx(2.5, rel=1e-5) and fit.shift == pytest.approx(1.25, rel=1e-5)
    assert fit.points == mask.sum() and fit.inliers == fit.points and fit.residual < 1e-4
    np.testing.assert_allclose(apply_alignment(pred, fit), 2.5 * pred + 1.25, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_exact_scale_and_shift_are_recovered_in_inverse_space(method):
    disparity, mask, _ = _relation()
    depth = 1.0 / (0.08 * disparity + 0.01)  # metres from 6 to 11
    fit = align_depth(disparity, _sparse(mask, depth), space="inverse", method=method)
    assert fit.ok and fit.space == "inverse"
    assert fit.scale == pytest.approx(0.08, rel=1e-4) and fit.shift == pytest.approx(0.01, rel=1e-4)
    np.testing.assert_allclose(apply_alignment(disparity, fit), depth, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_thirty_percent_gross_outliers_still_give_scale_and_shift_within_one_percent(method):
    pred, mask, rng = _relation(shape=(120, 160), density=0.2)
    depth = (3.0 * pred + 2.0) * (1.0 + 0.005 * rng.standard_normal(pred.shape))  # 0.5 % range noise
    gross = mask & (rng.random(pred.shape) < 0.3)
    depth[gross] = rng.uniform(0.5, 60.0, gross.sum())  # see-through, occlusion, multipath returns
    sparse = _sparse(mask, depth)
    plain_scale = np.polyfit(pred[mask], sparse[mask], 1)[0]
    assert abs(plain_scale - 3.0) > 0.1, "the outliers must actually spoil plain least squares"
    fit = align_depth(pred, sparse, method=method)
    assert fit.ok
    assert fit.scale == pytest.approx(3.0, rel=0.01) and fit.shift == pytest.approx(2.0, rel=0.01)
    assert 0.65 * fit.points < fit.inliers < 0.8 * fit.points
    assert fit.residual < 0.2  # metres: the inlier noise is ~0.05 m


@pytest.mark.parametrize("method", METHODS)
def test_negative_scale_falls_back_to_scale_only(method):
    pred, mask, _ = _relation()
    depth = 12.0 - 2.0 * pred  # nearer where the prediction says farther: the affine fit has s < 0
    fit = align_depth(pred, _sparse(mask, depth), method=method)
    assert fit.ok and fit.scale_only and "scale-only" in fit.reason
    assert fit.shift == 0.0 and fit.scale > 0
    x, y = pred[mask].astype(np.float64), depth[mask]
    assert fit.scale == pytest.approx(np.sum(x * y) / np.sum(x * x), rel=0.15)  # least squares through 0


@pytest.mark.parametrize("count", [0, 1])
@pytest.mark.parametrize("space", ["depth", "inverse"])
def test_zero_or_one_valid_point_fails_softly(count, space):
    pred, _, _ = _relation()
    sparse = np.zeros_like(pred)
    sparse.flat[:count] = 5.0
    fit = align_depth(pred, sparse, space=space, min_points=2)
    assert not fit.ok and (fit.scale, fit.shift) == (1.0, 0.0) and fit.points == count
    assert fit.reason.startswith(f"no alignment: {count} valid points")
    if space == "depth":
        np.testing.assert_array_equal(apply_alignment(pred, fit), pred)


def test_no_finite_prediction_and_too_few_points_fail_softly():
    pred, mask, _ = _relation()
    sparse = _sparse(mask, 2 * pred)
    assert not align_depth(np.full_like(pred, np.nan), sparse).ok
    assert align_depth(pred, sparse, min_points=int(mask.sum()) + 1).reason.startswith("no alignment:")
    constant = align_depth(np.full_like(pred, 3.0), sparse)
    assert not constant.ok and "constant" in constant.reason


def test_bad_arguments_raise_value_errors():
    pred, mask, _ = _relation()
    with pytest.raises(ValueError, match="one shape"):
        align_depth(pred, pred[:-1])
    with pytest.raises(ValueError, match="min_points"):
        align_depth(pred, pred, min_points=1)
    with pytest.raises(ValueError, match="momentum"):
        AlignmentPrior(momentum=1.0)


def test_apply_alignment_marks_non_positive_depth_nan():
    pred = np.array([[1.0, -1.0], [np.nan, 4.0]], dtype=np.float32)
    inverse = apply_alignment(pred, Alignment(scale=1.0, shift=0.0, space="inverse", ok=True))
    np.testing.assert_array_equal(np.isnan(inverse), [[False, True], [True, False]])
    assert inverse[1, 1] == pytest.approx(0.25)
    depth = apply_alignment(pred, Alignment(scale=2.0, shift=-3.0, space="depth", ok=True))
    np.testing.assert_array_equal(np.isnan(depth), [[True, True], [True, False]])


def _frame_fits(scales, shift, prior):
    pred, mask, _ = _relation(shape=(40, 60))
    return [align_depth(pred, _sparse(mask, s * pred + shift), prior=prior) for s in scales]


def test_temporal_prior_smooths_a_jumpy_scale_and_converges():
    jumpy = 2.0 * (1 + 0.2 * np.tile([1.0, -1.0], 40))  # scale flickering +-20 % frame to frame
    raw = [fit.scale for fit in _frame_fits(jumpy, 1.0, None)]
    prior = AlignmentPrior(momentum=0.9)
    smooth = [fit.scale for fit in _frame_fits(jumpy, 1.0, prior)]
    assert np.var(smooth[40:]) < 0.05 * np.var(raw[40:])  # after the start-up transient (0.9 ** 40 ~ 1.5 %)
    assert np.mean(smooth[40:]) == pytest.approx(2.0, rel=0.01)
    settled = _frame_fits([3.0] * 60, 1.0, prior)  # the scene changes scale: the prior follows
    assert settled[-1].scale == pytest.approx(3.0, rel=0.01) and settled[-1].shift == pytest.approx(1.0, rel=0.01)
    assert settled[0].scale < 2.2 and "smoothed" in settled[-1].reason


def test_temporal_prior_holds_over_short_failures_then_resets():
    prior = AlignmentPrior(momentum=0.5, max_age=2)
    pred, mask, _ = _relation(shape=(40, 60))
    good = align_depth(pred, _sparse(mask, 2.0 * pred + 1.0), prior=prior)
    empty = np.zeros_like(pred)
    held = [align_depth(pred, empty, prior=prior) for _ in range(2)]
    assert all(fit.ok and fit.from_prior and fit.scale == good.scale for fit in held)
    assert "2 frame(s) ago" in held[-1].reason
    stale = align_depth(pred, empty, prior=prior)
    assert not stale.ok and stale.scale == 1.0 and prior.scale is None  # reset: the next good fit starts fresh
    fresh = align_depth(pred, _sparse(mask, 5.0 * pred), prior=prior)
    assert fresh.scale == pytest.approx(5.0, rel=1e-5)


def _beam_scene(height=96, width=320, focal=300.0, camera_height=1.65, wall=20.0):
    """Ground plane + a wall at `wall` metres seen by a camera and scanned by 64 beams (HDL-64-like elevations).

    Returns (P, true depth (H, W), sparse depth (H, W)); the LiDAR sits at the camera (identity extrinsic).
    """
    projection = np.array([[focal, 0, width / 2, 0], [0, focal, height / 2, 0], [0, 0, 1, 0]])
    ray_down = np.repeat((np.arange(height)[:, None] - height / 2) / focal, width, axis=1)
    with np.errstate(divide="ignore"):
        truth = np.minimum(np.where(ray_down > 0, camera_height / ray_down, np.inf), wall)
    elevation, azimuth = np.meshgrid(
        np.deg2rad(np.linspace(-24.8, 2.0, 64)), np.deg2rad(np.arange(-45, 45, 0.35)), indexing="ij"
    )
    rays = np.stack(
        [np.sin(azimuth) * np.cos(elevation), -np.sin(elevation), np.cos(azimuth) * np.cos(elevation)], axis=-1
    ).reshape(-1, 3)
    with np.errstate(divide="ignore"):
        ground = np.where(rays[:, 1] > 0, camera_height / rays[:, 1], np.inf)
    points = rays * np.minimum(ground, wall / rays[:, 2])[:, None]
    return projection, truth.astype(np.float32), project_lidar(points, np.eye(4), projection, height, width)


def test_ip_basic_fills_a_synthetic_64_beam_scan():
    _, truth, sparse = _beam_scene()
    before = sparse.copy()
    dense = ip_basic_fill(sparse, extrapolate=False)
    np.testing.assert_array_equal(sparse, before)  # input untouched
    assert 0.05 < (sparse > 0).mean() < 0.2  # as sparse as a real scan in this window
    lower = slice(truth.shape[0] // 2, None)
    filled = dense[lower] > 0
    error = (dense - truth)[lower][filled]
    rmse = float(np.sqrt(np.mean(error**2)))
    print(f"synthetic 64-beam fill: {filled.mean():.1%} of the lower image filled, RMSE {rmse:.3f} m")
    assert filled.mean() >= 0.95
    assert rmse < 0.8  # measured 0.40 m: pixel rounding of the points costs up to ~0.4 m at the wall edge
    assert (dense[:30] == 0).all()  # above the highest beam nothing is invented without extrapolate
    assert (ip_basic_fill(sparse, extrapolate=True) > 0).all()


def test_ip_basic_ignores_non_finite_and_out_of_range_points():
    sparse = np.zeros((20, 30), np.float32)
    sparse[10, 10], sparse[10, 12], sparse[10, 14], sparse[10, 16] = 5.0, np.nan, np.inf, 150.0
    dense = ip_basic_fill(sparse, max_depth=100.0, extrapolate=False, blur="gaussian")
    assert np.isfinite(dense).all()
    assert dense[10, 10] == pytest.approx(5.0) and dense[10, 16] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        ip_basic_fill(np.zeros(5, np.float32))


@pytest.fixture(scope="module")
def kitti_frame(shared_data: Path):
    """Sparse depth projected from the real Velodyne scan with project_lidar, and the official annotated GT."""
    from distill.data.kitti import camera_projection, read_calib, read_velodyne, velodyne_to_rectified
    from distill.data.samples import read_depth_png

    calib = read_calib(shared_data / KITTI / "2011_09_26")
    projection, (height, width) = camera_projection(calib, 2)
    scan = read_velodyne(shared_data / DRIVE / "velodyne_points/data/0000000005.bin")
    sparse = project_lidar(scan[:, :3], velodyne_to_rectified(calib), projection, height, width)
    gt = read_depth_png(shared_data / KITTI_GT / "0000000005.png", 1.0 / 256.0)
    return sparse, gt


def test_ip_basic_on_the_real_kitti_frame_matches_the_annotated_ground_truth(kitti_frame):
    sparse, gt = kitti_frame
    assert sparse.shape == gt.shape == (375, 1242) and 18_000 < (sparse > 0).sum() < 20_000
    dense = ip_basic_fill(sparse)
    valid = gt > 0
    assert (dense[valid] > 0).all()
    error = dense[valid] - gt[valid]
    rmse, mae = float(np.sqrt(np.mean(error**2))), float(np.mean(np.abs(error)))
    print(f"IP-Basic on KITTI 0001/0000000005 vs annotated GT: RMSE {rmse:.3f} m, MAE {mae:.3f} m")
    assert rmse < 3.0 and mae < 1.0  # IP-Basic reports ~1.3 m RMSE on KITTI; measured 1.23 m here


@pytest.mark.parametrize("space", ["depth", "inverse"])
def test_alignment_to_real_lidar_reduces_the_error_of_a_misscaled_prediction(kitti_frame, space):
    sparse, gt = kitti_frame
    dense = ip_basic_fill(sparse)
    pred = 0.6 * dense + 2.0 if space == "depth" else 3.0 / dense + 0.05  # relative depth / relative disparity
    unaligned = pred if space == "depth" else 1.0 / pred
    fit = align_depth(pred, gt, space=space)
    aligned = apply_alignment(pred, fit)
    valid = gt > 0
    before = float(np.sqrt(np.mean((unaligned[valid] - gt[valid]) ** 2)))
    after = float(np.sqrt(np.nanmean((aligned[valid] - gt[valid]) ** 2)))
    print(f"{space} space: RMSE vs GT unaligned {before:.3f} m, aligned {after:.3f} m ({fit})")
    assert fit.ok and after < 0.5 * before and after < 2.0
