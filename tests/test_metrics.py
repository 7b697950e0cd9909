"""Golden-value tests of the evaluation metrics (KITTI Eigen-split / NYU protocol): hand-computed numbers, crops,
alignment, averaging."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from distill.errors import UserError
from distill.metrics import (
    METRIC_KEYS,
    EmptyFrameError,
    MetricAccumulator,
    crop_mask,
    depth_metrics,
    format_metrics_table,
)

GT = np.array([[1.0, 2.0], [4.0, 8.0]])
KITTI_GT = Path("kitti_raw_sample/data_depth_annotated/train/2011_09_26_drive_0001_sync/proj_depth/groundtruth")


def _kitti_gt(shared_data: Path) -> np.ndarray:
    """The official sparse KITTI annotation of the sample frame, (375, 1242) float64 metres, 0 = invalid."""
    raw = cv2.imread(str(shared_data / KITTI_GT / "image_02" / "0000000005.png"), cv2.IMREAD_UNCHANGED)
    return raw.astype(np.float64) / 256.0


def test_doubled_prediction_gives_known_values():
    m = depth_metrics(2 * GT, GT)
    assert m["abs_rel"] == pytest.approx(1.0)
    assert m["sq_rel"] == pytest.approx((1 + 2 + 4 + 8) / 4)  # (gt - 2gt)^2 / gt = gt
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 4 + 16 + 64) / 4))
    assert m["rmse_log"] == pytest.approx(math.log(2))
    assert m["log10"] == pytest.approx(math.log10(2))
    assert m["silog"] == pytest.approx(0.0, abs=1e-6)  # a pure scale error has no log variance
    assert (m["d1"], m["d2"], m["d3"]) == (0.0, 0.0, 0.0)  # ratio 2 > 1.25^3 = 1.953
    assert set(m) == set(METRIC_KEYS) and all(type(v) is float for v in m.values())


def test_constant_offset_gives_known_values():
    m = depth_metrics(GT + 1.0, GT)
    inverse_mean = (1 + 1 / 2 + 1 / 4 + 1 / 8) / 4
    assert m["abs_rel"] == pytest.approx(inverse_mean)
    assert m["sq_rel"] == pytest.approx(inverse_mean)
    assert m["rmse"] == pytest.approx(1.0)
    logs = [math.log((g + 1) / g) for g in (1, 2, 4, 8)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(v * v for v in logs) / 4))
    assert m["silog"] == pytest.approx(100 * math.sqrt(sum(v * v for v in logs) / 4 - (sum(logs) / 4) ** 2))
    # ratios 2, 1.5, 1.25, 1.125: the threshold is strict, so 1.25 fails δ1
    assert (m["d1"], m["d2"], m["d3"]) == (0.25, 0.75, 0.75)


def test_perfect_prediction_is_exact():
    m = depth_metrics(GT, GT)
    assert all(m[k] == 0.0 for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"))
    assert (m["d1"], m["d2"], m["d3"]) == (1.0, 1.0, 1.0)


def test_median_alignment_recovers_scaled_prediction():
    raw = depth_metrics(0.37 * GT, GT)
    aligned = depth_metrics(0.37 * GT, GT, align="median")
    assert raw["abs_rel"] > 0.5
    assert aligned["abs_rel"] == pytest.approx(0.0, abs=1e-12) and aligned["d1"] == 1.0


def test_lsq_alignment_recovers_scale_and_shift():
    relative = (GT - 3.0) / 2.5  # includes negative values, which only an affine fit can repair
    assert depth_metrics(relative, GT)["d1"] < 1.0
    aligned = depth_metrics(relative, GT, align="lsq")
    assert aligned["rmse"] == pytest.approx(0.0, abs=1e-9) and aligned["d1"] == 1.0


def test_alignment_runs_before_clamping():
    # Relative depths far below min_depth: clamping first would flatten them all to 1e-3 and lose the structure.
    aligned = depth_metrics(GT * 1e-5, GT, align="median")
    assert aligned["abs_rel"] == pytest.approx(0.0, abs=1e-9)


def test_invalid_ground_truth_is_ignored():
    gt = np.array([[2.0, 0.0, np.nan], [90.0, 1e-4, np.inf]])  # only the 2 m pixel is valid for [1e-3, 80]
    pred = np.array([[3.0, 50.0, 1.0], [2.0, 7.0, 9.0]])
    m = depth_metrics(pred, gt)
    assert m["abs_rel"] == pytest.approx(0.5) and m["rmse"] == pytest.approx(1.0)


def test_nan_and_inf_predictions_go_to_the_bounds():
    gt = np.full((2, 2), 10.0)
    pred = np.array([[10.0, 10.0], [10.0, np.nan]])
    assert depth_metrics(pred, gt)["abs_rel"] == pytest.approx((10.0 - 1e-3) / 10.0 / 4)
    pred[1, 1] = np.inf
    assert depth_metrics(pred, gt)["abs_rel"] == pytest.approx(70.0 / 10.0 / 4)
    assert all(math.isfinite(v) for v in depth_metrics(pred, gt, align="median").values())


def test_predictions_are_clamped_to_the_range():
    m = depth_metrics(np.array([[100.0, -5.0]]), np.array([[40.0, 8.0]]), max_depth=80.0)
    assert m["abs_rel"] == pytest.approx((40.0 / 40.0 + (8.0 - 1e-3) / 8.0) / 2)


def test_no_valid_pixel_raises_clear_error():
    with pytest.raises(EmptyFrameError, match="no ground-truth pixel"):
        depth_metrics(np.ones((4, 4)), np.zeros((4, 4)))
    assert issubclass(EmptyFrameError, ValueError)
    gt = np.zeros((375, 1242))
    gt[:100] = 10.0  # labels only above the Garg crop
    with pytest.raises(EmptyFrameError, match="garg"):
        depth_metrics(np.ones_like(gt), gt, crop="garg")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs"):
        depth_metrics(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="one"):
        depth_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)))


@pytest.mark.parametrize(
    ("crop", "size", "rows", "cols"),
    [
        ("garg", (375, 1242), (153, 371), (44, 1197)),  # int(0.40810811*375) .. int(0.96405229*1242)
        ("eigen", (375, 1242), (124, 342), (44, 1197)),  # int(0.3324324*375), int(0.91351351*375)
        ("nyu", (480, 640), (45, 471), (41, 601)),
        ("nyu", (240, 320), (23, 236), (21, 301)),  # 22.5, 235.5, 20.5, 300.5 rounded half up
        ("nyu", (120, 160), (11, 118), (10, 150)),  # the real NYU sample's size
        (None, (5, 7), (0, 5), (0, 7)),
    ],
)
def test_crop_mask_hits_the_right_rows_and_cols(crop, size, rows, cols):
    mask = crop_mask(*size, crop)
    expected = np.zeros(size, dtype=bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    np.testing.assert_array_equal(mask, expected)


def test_crop_restricts_the_evaluated_pixels():
    gt = np.full((375, 1242), 10.0)
    pred = gt.copy()
    pred[:153] = 20.0  # wrong only above the Garg crop
    assert depth_metrics(pred, gt, crop="garg")["abs_rel"] == 0.0
    assert depth_metrics(pred, gt)["abs_rel"] > 0.0
    with pytest.raises(ValueError, match="unknown crop"):
        depth_metrics(pred, gt, crop="kb")


def test_torch_and_numpy_give_identical_numbers():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 70.0, size=(24, 32)).astype(np.float32)
    gt[rng.random(gt.shape) < 0.3] = 0.0
    pred = gt * rng.uniform(0.7, 1.4, size=gt.shape).astype(np.float32) + 0.1
    for align in (None, "median", "lsq"):
        from_numpy = depth_metrics(pred, gt, align=align)
        from_torch = depth_metrics(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None], align=align)
        assert from_numpy == from_torch


def test_real_kitti_annotation_with_garg_crop(shared_data):
    gt = _kitti_gt(shared_data)
    assert gt.shape == (375, 1242) and (gt > 0).sum() > 50_000
    m = depth_metrics(0.9 * gt + (gt == 0), gt, crop="garg")  # a dense prediction 10 % too near
    assert m["abs_rel"] == pytest.approx(0.1) and m["d1"] == 1.0
    assert m["rmse_log"] == pytest.approx(-math.log(0.9))
    assert depth_metrics(0.9 * gt, gt, crop="eigen", align="median")["abs_rel"] == pytest.approx(0.0, abs=1e-12)


def test_accumulator_averages_per_image_not_per_pixel():
    acc = MetricAccumulator(max_depth=80.0)
    one_pixel = np.zeros((10, 10))
    one_pixel[0, 0] = 5.0
    acc.update(2 * one_pixel, one_pixel)  # abs_rel 1 on 1 pixel
    acc.update(np.full((10, 10), 5.0), np.full((10, 10), 5.0))  # abs_rel 0 on 100 pixels
    acc.update(np.ones((10, 10)), np.zeros((10, 10)))  # no label: skipped
    result = acc.result()
    assert result["abs_rel"] == pytest.approx(0.5)  # per pixel it would be 1 / 101
    assert result["count"] == 2 and result["skipped"] == 1


def test_accumulator_takes_batches_and_per_call_options():
    acc = MetricAccumulator()
    gt = torch.full((3, 1, 4, 4), 10.0)
    acc.update(torch.stack([gt[0] * 0.5, gt[1], gt[2] * 2]), gt)
    assert acc.result()["count"] == 3
    assert acc.result()["abs_rel"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    acc.update(gt[:1] * 3, gt[:1], align="median")  # a perfectly aligned fourth image
    assert acc.result()["abs_rel"] == pytest.approx((0.5 + 0.0 + 1.0) / 4)


def test_accumulator_without_any_label_is_a_user_error():
    acc = MetricAccumulator(crop="garg")
    acc.update(np.ones((8, 8)), np.zeros((8, 8)))
    with pytest.raises(UserError, match="1 skipped"):
        acc.result()


def test_metrics_table_order_and_alignment():
    rows = {
        "student": depth_metrics(GT + 1.0, GT),
        "teacher-long-name": {**depth_metrics(GT, GT), "count": 2},
        "partial": {"rmse": 2.5},
    }
    table = format_metrics_table(rows)
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "AbsRel", "SqRel", "RMSE", "RMSElog", "SILog", "δ1", "δ2", "δ3", "log10"]
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1  # every line padded to the same width
    student = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert student[:4] == ["student", "0.4688", "0.4688", "1.000"] and student[6] == "0.2500"
    assert [cell.strip() for cell in lines[4].strip("|").split("|")][1:4] == ["-", "-", "2.500"]
