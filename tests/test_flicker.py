"""Forward warping of depth between views and the flicker metric on synthetic pairs with known motion."""

from __future__ import annotations

import numpy as np
import pytest

from depth_node.geometry import forward_warp
from distill.flicker import FlickerAccumulator, pair_flicker

HEIGHT, WIDTH = 40, 60
K = np.array([[50.0, 0.0, 29.5], [0.0, 50.0, 19.5], [0.0, 0.0, 1.0]])
P = np.concatenate([K, np.zeros((3, 1))], axis=1)


def forward(metres: float) -> np.ndarray:
    """T_cur_prev of a camera that moved `metres` along its optical axis."""
    motion = np.eye(4)
    motion[2, 3] = -metres
    return motion


def wall(depth: float) -> np.ndarray:
    return np.full((HEIGHT, WIDTH), depth)


def test_forward_warp_moves_a_wall_and_its_pixels_exactly():
    warped, source = forward_warp(wall(10.0), P, forward(2.0))
    landed = source >= 0
    assert np.all(warped[landed] == pytest.approx(8.0))  # the camera came 2 m closer
    # Pixel (u, v) of the first view lands at cx + (u - cx) * 10 / 8: check the source of every landed pixel.
    rows, cols = np.nonzero(landed)
    src_rows, src_cols = np.divmod(source[landed], WIDTH)
    np.testing.assert_array_less(np.abs(src_cols + (src_cols - K[0, 2]) * 0.25 - cols), 0.5 + 1e-9)
    np.testing.assert_array_less(np.abs(src_rows + (src_rows - K[1, 2]) * 0.25 - rows), 0.5 + 1e-9)
    # Coming closer spreads the pixels apart: holes open between them, about 1 - (8 / 10)^2 of the view.
    assert landed[HEIGHT // 2, WIDTH // 2] and 0.25 < 1 - landed.mean() < 0.45


def test_forward_warp_keeps_the_nearest_surface_and_skips_invalid_depth():
    depth = wall(25.0)
    depth[10:20, 20:30] = 5.0  # a box in front of the wall
    depth[0, :] = np.nan
    sideways = np.eye(4)
    sideways[0, 3] = -1.0  # the camera moved 1 m right: the box shifts 10 px left, the wall 2 px
    warped, source = forward_warp(depth, P, sideways)
    assert np.all(warped[10:20, 10:20] == 5.0)  # the box, now in front of wall pixels
    np.testing.assert_array_equal(source[10:20, 10:20] % WIDTH, np.arange(20, 30)[None].repeat(10, 0))
    assert np.all(warped[1:, 30:58] == 25.0)  # the wall it uncovered, from 2 px further right
    assert not (source[0] >= 0).any() and not (source[source >= 0] < WIDTH).any()  # the NaN row went nowhere


def test_flicker_is_zero_for_perfect_or_constantly_biased_predictions_and_grows_with_noise():
    gt_prev, gt_cur = wall(10.0), wall(8.0)
    motion = forward(2.0)
    value, pixels = pair_flicker((gt_prev, gt_cur), (gt_prev, gt_cur), K, motion)
    assert value == pytest.approx(0.0, abs=1e-12) and pixels > 0.5 * HEIGHT * WIDTH
    value, _ = pair_flicker((gt_prev * 1.3, gt_cur * 1.3), (gt_prev, gt_cur), K, motion)
    assert value == pytest.approx(0.0, abs=1e-12)  # a steady bias is an error, not flicker
    rng = np.random.default_rng(0)
    small = pair_flicker((gt_prev * np.exp(rng.normal(0, 0.02, gt_prev.shape)), gt_cur), (gt_prev, gt_cur), K, motion)
    large = pair_flicker((gt_prev * np.exp(rng.normal(0, 0.1, gt_prev.shape)), gt_cur), (gt_prev, gt_cur), K, motion)
    assert 0.01 < small[0] < 0.025 and 0.06 < large[0] < 0.1  # E|N(0, s)| = 0.8 s
    # A frame-wide scale jump of 10 % between the frames is flicker of ln 1.1.
    jumped, _ = pair_flicker((gt_prev, gt_cur * 1.1), (gt_prev, gt_cur), K, motion)
    assert jumped == pytest.approx(np.log(1.1))


def test_flicker_ignores_pixels_whose_ground_truth_does_not_follow_the_motion():
    """A car that moved on its own (its ground truth disagrees with the warp) does not count, whatever predicted."""
    gt_prev, gt_cur = wall(10.0), wall(8.0)
    gt_cur[10:30, 10:30] = 4.0  # something arrived in front: not the surface seen before
    pred_cur = gt_cur.copy()
    pred_cur[10:30, 10:30] = 1.0  # wildly wrong there
    value, pixels = pair_flicker((gt_prev, pred_cur), (gt_prev, gt_cur), K, forward(2.0))
    assert value == pytest.approx(0.0, abs=1e-12) and 0 < pixels < HEIGHT * WIDTH - 400


def test_accumulator_pairs_consecutive_frames_of_a_drive_only():
    accumulator = FlickerAccumulator((1e-3, 80.0))
    pose = [np.eye(4) for _ in range(3)]
    for index, step in enumerate(pose):
        step[2, 3] = 2.0 * index  # world_from_camera: the camera drives 2 m forward a frame
    depths = [wall(10.0 - 2.0 * index) for index in range(3)]
    for index in range(3):
        accumulator.update(depths[index] * (1.2 if index == 1 else 1.0), depths[index], K, pose[index], "a", index)
    accumulator.update(wall(5.0), wall(5.0), K, np.eye(4), "b", 0)  # another drive: no pair with drive a
    result = accumulator.result()
    assert result["flicker_pairs"] == 2 and result["flicker"] == pytest.approx(np.log(1.2))
    assert FlickerAccumulator((1e-3, 80.0)).result() == {}
