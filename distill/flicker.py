"""Temporal consistency of depth on video: flicker between consecutive frames of a drive with known ego motion.

For frames t-1 and t with ground truth D and prediction d (metres), camera poses T_world_cam and intrinsics K:
every pixel p of t-1 with ground truth is back-projected with D_{t-1}(p), moved by the relative pose
camera(t-1) -> camera(t) and projected into t (pixel q, nearest point per pixel). The pair counts where the scene is
static and seen in both frames: q has ground truth and the moved point lands on it, |ln z_moved - ln D_t(q)| <
`tolerance` (this drops disocclusions, occluders and independently moving cars; a car that moves only a little
keeps consistent ground truth, whose depth change is then taken from D as for any other point). The previous
prediction carried along the motion is warp(d_{t-1})(q) = d_{t-1}(p) D_t(q) / D_{t-1}(p), and

    flicker = mean over those pixels of |ln d_t(q) - ln warp(d_{t-1})(q)|

i.e. how much the log error changes from one frame to the next on the same surface point: 0 for a perfect (or a
constantly biased) prediction, larger the more the prediction wobbles. Frames are averaged per pair, like the
per-image KITTI metrics.
"""

from __future__ import annotations

import numpy as np

from depth_node.geometry import forward_warp
from distill.metrics import Align

TOLERANCE = 0.03  # |ln| mismatch between moved and observed ground truth still counted as the same static point


def aligned(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, align: Align, depth_range: tuple[float, float]):
    """(H, W) prediction after the per-frame alignment of the KITTI metrics (fitted on `valid`), clamped to the
    depth range; NaN, -inf -> min, +inf -> max as `distill.metrics.depth_metrics` does."""
    low, high = depth_range
    pred = np.nan_to_num(np.asarray(pred, np.float64), nan=low, posinf=high, neginf=low)
    if align == "median" and valid.any():
        pred = pred * (np.median(gt[valid]) / max(np.median(pred[valid]), 1e-12))
    elif align == "lsq" and valid.sum() > 1:
        scale, shift = np.polyfit(pred[valid], gt[valid], 1)
        pred = scale * pred + shift
    return np.clip(pred, low, high)


def pair_flicker(
    preds: tuple[np.ndarray, np.ndarray],
    gts: tuple[np.ndarray, np.ndarray],
    K: np.ndarray,
    T_cur_prev: np.ndarray,
    *,
    depth_range: tuple[float, float] = (1e-3, 80.0),
    tolerance: float = TOLERANCE,
) -> tuple[float, int]:
    """Flicker of one pair of consecutive frames (see the module docstring).

    Args:
        preds: (d_{t-1}, d_t), each (H, W) positive metres (already aligned and clamped, see `aligned`).
        gts: (D_{t-1}, D_t), each (H, W) metres, outside the open `depth_range` (or non-finite) = no label.
        K: (3, 3) intrinsics of both frames, pixels.
        T_cur_prev: (4, 4) taking camera(t-1) coordinates into camera(t), metres.
        tolerance: see `TOLERANCE`.

    Returns:
        (flicker, number of pixels it averages); (nan, 0) when no pixel is shared.
    """
    pred_prev, pred_cur, gt_prev, gt_cur = (np.asarray(array, np.float64) for array in (*preds, *gts))
    low, high = depth_range
    with np.errstate(invalid="ignore"):
        labelled_prev = np.isfinite(gt_prev) & (gt_prev > low) & (gt_prev < high)
        labelled_cur = np.isfinite(gt_cur) & (gt_cur > low) & (gt_cur < high)
    projection = np.concatenate([np.asarray(K, np.float64), np.zeros((3, 1))], axis=1)
    moved, source = forward_warp(np.where(labelled_prev, gt_prev, 0.0), projection, T_cur_prev)
    shared = (source >= 0) & labelled_cur
    with np.errstate(divide="ignore", invalid="ignore"):
        shared &= np.abs(np.log(moved) - np.log(gt_cur)) < tolerance
    if not shared.any():
        return float("nan"), 0
    p = source[shared]
    carried = np.log(pred_prev.ravel()[p]) + np.log(gt_cur[shared]) - np.log(gt_prev.ravel()[p])
    return float(np.mean(np.abs(np.log(pred_cur[shared]) - carried))), int(shared.sum())


class FlickerAccumulator:
    """Flicker over a sequence fed frame by frame: pairs are consecutive frames of the same drive.

    Args:
        depth_range: (min, max) metres of valid ground truth and of the prediction clamp.
        align: per-frame alignment of the predictions, as in the KITTI metrics.
    """

    def __init__(self, depth_range: tuple[float, float], align: Align = None) -> None:
        self.depth_range, self.align = depth_range, align
        self.previous: tuple | None = None
        self.total, self.pairs = 0.0, 0

    def update(self, pred, gt, K, pose: np.ndarray, drive: str, frame: int) -> None:
        """Add one frame: (H, W) prediction and ground truth (metres), (3, 3) K, (4, 4) T_world_cam pose."""
        gt = np.asarray(gt, np.float64)
        low, high = self.depth_range
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(gt) & (gt > low) & (gt < high)
        pred = aligned(pred, gt, valid, self.align, self.depth_range)
        pose = np.asarray(pose, np.float64)
        previous, self.previous = self.previous, (drive, frame, pred, gt, pose)
        if previous is None or previous[0] != drive or previous[1] != frame - 1:
            return
        T_cur_prev = np.linalg.inv(pose) @ previous[4]
        preds, gts = (previous[2], pred), (previous[3], gt)
        value, pixels = pair_flicker(preds, gts, K, T_cur_prev, depth_range=self.depth_range)
        if pixels:
            self.total, self.pairs = self.total + value, self.pairs + 1

    def result(self) -> dict[str, float | int]:
        """{"flicker": mean over pairs, "flicker_pairs": pairs counted}; empty when no pair was seen."""
        return {"flicker": self.total / self.pairs, "flicker_pairs": self.pairs} if self.pairs else {}
