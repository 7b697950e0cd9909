"""Monocular depth evaluation: the KITTI Eigen-split protocol (Eigen et al., NeurIPS 2014; Garg crop of Garg et al.,
ECCV 2016) and the NYU Eigen crop, per image, averaged over images.

Definitions follow the AdaBins / monodepth2 evaluation code (``compute_errors``). For one image with valid ground truth
``gt`` and prediction ``p`` (both metres, over the valid pixels only):

    AbsRel  = mean(|gt - p| / gt)              SqRel   = mean((gt - p)^2 / gt)
    RMSE    = sqrt(mean((gt - p)^2))           RMSElog = sqrt(mean((ln gt - ln p)^2))
    log10   = mean(|log10 gt - log10 p|)       SILog   = 100 * sqrt(mean(e^2) - mean(e)^2),  e = ln p - ln gt
    d_k     = mean(max(gt / p, p / gt) < 1.25^k),  k = 1, 2, 3

Numbers are computed in float64 with numpy, so numpy and torch inputs give identical results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from distill.errors import UserError

Crop = Literal["garg", "eigen", "nyu"] | None
Align = Literal["median", "lsq"] | None

METRIC_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3")

# (key, column title, decimals) in the column order the papers print.
_TABLE_COLUMNS = (
    ("abs_rel", "AbsRel", 4),
    ("sq_rel", "SqRel", 4),
    ("rmse", "RMSE", 3),
    ("rmse_log", "RMSElog", 4),
    ("silog", "SILog", 2),
    ("d1", "δ1", 4),
    ("d2", "δ2", 4),
    ("d3", "δ3", 4),
    ("log10", "log10", 4),
)

# Fractions of the full-resolution image (rows top, bottom, cols left, right), as in monodepth2 / AdaBins.
_GARG = (0.40810811, 0.99189189, 0.03594771, 0.96405229)
_EIGEN = (0.3324324, 0.91351351, 0.03594771, 0.96405229)
# NYU Eigen crop in pixels of the 480x640 image (rows 45:471, cols 41:601).
_NYU_PIXELS, _NYU_SIZE = (45, 471, 41, 601), (480, 640)


class EmptyFrameError(ValueError):
    """A frame has no pixel with valid ground truth inside the crop, so it has no metrics."""


def crop_mask(height: int, width: int, crop: Crop) -> np.ndarray:
    """Evaluation crop as a boolean mask.

    The fractions refer to the **full-resolution** image (KITTI 375x1242-ish, NYU 480x640): a prediction made on the
    352x1216 KB crop must be pasted into a full-size canvas (zeros elsewhere) before masking; this module never
    pastes, it masks whatever it is given.

    - "garg": rows int(0.40810811 H):int(0.99189189 H), cols int(0.03594771 W):int(0.96405229 W).
    - "eigen": rows int(0.3324324 H):int(0.91351351 H), cols as Garg. This is the KITTI ``eigen_crop`` of the
      AdaBins / BTS evaluation code (monodepth2 only implements Garg); bounds truncate with int() like that code.
    - "nyu": rows 45:471, cols 41:601, defined for 480x640. Other sizes scale those bounds proportionally and round
      to the nearest pixel, halves up (a 240x320 image keeps rows 23:236, cols 21:301), so 480x640 is exact.
    - None (or "none"): every pixel.

    Args:
        height: image rows H.
        width: image columns W.
        crop: which crop.

    Returns:
        (H, W) bool, True inside the crop.
    """
    mask = np.zeros((height, width), dtype=bool)
    if crop is None or crop == "none":
        mask[:] = True
    elif crop in ("garg", "eigen"):
        top, bottom, left, right = _GARG if crop == "garg" else _EIGEN
        mask[int(top * height) : int(bottom * height), int(left * width) : int(right * width)] = True
    elif crop == "nyu":
        top, bottom, left, right = _NYU_PIXELS
        sy, sx = height / _NYU_SIZE[0], width / _NYU_SIZE[1]
        rows, cols = _round_half_up(top * sy, bottom * sy), _round_half_up(left * sx, right * sx)
        mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    else:
        raise ValueError(f"unknown crop {crop!r}: expected None, 'garg', 'eigen' or 'nyu'")
    return mask


def _round_half_up(*values: float) -> tuple[int, ...]:
    """Nearest integers, .5 rounded up (python's round() rounds halves to even)."""
    return tuple(int(np.floor(v + 0.5)) for v in values)


def align_prediction(pred: np.ndarray, gt: np.ndarray, align: Align) -> np.ndarray:
    """Bring a relative prediction to the ground truth's scale, fitted on the given pixels.

    - "median": pred * median(gt) / median(pred) (per-image median scaling, monodepth2).
    - "lsq": s * pred + t with (s, t) the closed-form least-squares fit of pred to gt (MiDaS-style, in depth space).
      s may come out negative for a very poor prediction; it is kept, the later clamp bounds the result.
    - None (or "none"): pred unchanged.

    Args:
        pred: (N,) float64 predictions at the valid pixels, finite.
        gt: (N,) float64 ground truth at the same pixels, metres.
        align: which alignment.

    Returns:
        (N,) float64 aligned prediction.
    """
    if align is None or align == "none":
        return pred
    if align == "median":
        median_pred = np.median(pred)
        if median_pred <= 0:
            raise ValueError(f"median alignment needs a positive median prediction, got {median_pred:g}")
        return pred * (np.median(gt) / median_pred)
    if align == "lsq":
        pred_mean, gt_mean = pred.mean(), gt.mean()
        var = np.mean((pred - pred_mean) ** 2)
        # A constant prediction fixes only the shift: the best fit is then the mean ground truth.
        scale = np.mean((pred - pred_mean) * (gt - gt_mean)) / var if var > 0 else 0.0
        return scale * pred + (gt_mean - scale * pred_mean)
    raise ValueError(f"unknown align {align!r}: expected None, 'median' or 'lsq'")


def depth_metrics(
    pred,
    gt,
    *,
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    crop: Crop = None,
    align: Align = None,
) -> dict[str, float]:
    """Standard depth metrics of one image.

    Order of operations: valid pixels = finite gt with min_depth < gt < max_depth, inside the crop; non-finite
    predictions are replaced (NaN and -inf -> min_depth, +inf -> max_depth) so they count as errors; the
    alignment (if any) is fitted and applied on the valid pixels; finally predictions are clamped to
    [min_depth, max_depth] and the metrics computed. Aligning before clamping lets a relative prediction of any
    range be scaled first, as in the monodepth2 / MiDaS evaluation code.

    Args:
        pred: (H, W) predicted depth, metres (or relative when `align` is set); numpy array or torch tensor;
            (1, H, W) and (1, 1, H, W) are squeezed.
        gt: ground-truth depth of the same shape, metres, 0 or non-finite = no label.
        min_depth: lower bound of valid depth, metres (exclusive for gt).
        max_depth: upper bound of valid depth, metres (exclusive for gt); 80 for KITTI, 10 for NYU.
        crop: evaluation crop, see `crop_mask`.
        align: prediction alignment, see `align_prediction`.

    Returns:
        {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3"} as python floats.

    Raises:
        EmptyFrameError: no valid ground-truth pixel inside the crop (a ValueError).
        ValueError: shapes differ or are not a single image.
    """
    pred, gt = _as_image(pred, "pred"), _as_image(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt) & (gt > min_depth) & (gt < max_depth)
    valid &= crop_mask(*gt.shape, crop)
    if not valid.any():
        raise EmptyFrameError(
            f"no ground-truth pixel with {min_depth:g} < depth < {max_depth:g} m inside crop {crop!r} "
            f"(image {gt.shape[0]}x{gt.shape[1]})"
        )
    gt_v = gt[valid]
    pred_v = np.nan_to_num(pred[valid], nan=min_depth, posinf=max_depth, neginf=min_depth)
    pred_v = np.clip(align_prediction(pred_v, gt_v, align), min_depth, max_depth)
    return _errors(pred_v, gt_v)


def _as_image(array, name: str) -> np.ndarray:
    """numpy or torch, (H, W) or squeezable to it -> (H, W) float64 numpy."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be one (H, W) image (or (1, H, W), (1, 1, H, W)), got shape {array.shape}")
    return array


def _errors(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The metric formulas on (N,) valid, positive float64 depths."""
    ratio = np.maximum(gt / pred, pred / gt)
    diff = gt - pred
    log_err = np.log(pred) - np.log(gt)
    metrics = {
        "abs_rel": np.mean(np.abs(diff) / gt),
        "sq_rel": np.mean(diff**2 / gt),
        "rmse": np.sqrt(np.mean(diff**2)),
        "rmse_log": np.sqrt(np.mean(log_err**2)),
        "log10": np.mean(np.abs(np.log10(gt) - np.log10(pred))),
        "silog": 100.0 * np.sqrt(np.var(log_err)),  # var = mean(e^2) - mean(e)^2, computed without cancellation
        "d1": np.mean(ratio < 1.25),
        "d2": np.mean(ratio < 1.25**2),
        "d3": np.mean(ratio < 1.25**3),
    }
    return {key: float(value) for key, value in metrics.items()}


class MetricAccumulator:
    """Averages `depth_metrics` per image over a dataset (each image weighs the same, whatever its pixel count).

    Frames without any valid ground-truth pixel are skipped and counted in ``skipped``.

    Args:
        **defaults: keyword arguments of `depth_metrics` (min_depth, max_depth, crop, align) used by every update.
    """

    def __init__(self, **defaults) -> None:
        self.defaults = defaults
        self.count = 0
        self.skipped = 0
        self._sums = dict.fromkeys(METRIC_KEYS, 0.0)

    def update(self, pred, gt, **kw) -> None:
        """Add one image, or a batch of them.

        Args:
            pred: (H, W) / (1, H, W) / (1, 1, H, W) prediction, or a batch (B, H, W) / (B, 1, H, W); numpy or torch.
            gt: ground truth of the same shape, metres.
            **kw: `depth_metrics` keyword arguments overriding the defaults for this call.
        """
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from gt shape {tuple(gt.shape)}")
        if pred.ndim >= 3 and pred.shape[0] > 1:
            for pred_i, gt_i in zip(pred, gt):
                self.update(pred_i, gt_i, **kw)
            return
        try:
            metrics = depth_metrics(pred, gt, **{**self.defaults, **kw})
        except EmptyFrameError:
            self.skipped += 1
            return
        self.count += 1
        for key in METRIC_KEYS:
            self._sums[key] += metrics[key]

    def result(self) -> dict[str, float | int]:
        """Per-image means of every metric, plus "count" (images averaged) and "skipped" (images without labels).

        Raises:
            UserError: no image had a valid ground-truth pixel, so there is nothing to average.
        """
        if self.count == 0:
            raise UserError(
                f"no frame had a valid ground-truth pixel ({self.skipped} skipped): check the depth range "
                f"{self.defaults.get('min_depth', 1e-3):g}-{self.defaults.get('max_depth', 80.0):g} m and the crop"
            )
        means: dict[str, float | int] = {key: total / self.count for key, total in self._sums.items()}
        return {**means, "count": self.count, "skipped": self.skipped}


def format_metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table of metrics, one row per model, columns in the papers' order.

    Columns: AbsRel SqRel RMSE RMSElog SILog δ1 δ2 δ3 log10 (lower is better up to SILog, higher for δ).
    Cells are padded so the raw text lines up too; a missing metric prints "-".

    Args:
        rows: row name (e.g. model) -> metrics dict as returned by `depth_metrics` / `MetricAccumulator.result`.

    Returns:
        The table as text, lines joined by "\\n", no trailing newline.
    """
    header = ["model"] + [title for _, title, _ in _TABLE_COLUMNS]
    body = [
        [name] + [f"{metrics[key]:.{decimals}f}" if key in metrics else "-" for key, _, decimals in _TABLE_COLUMNS]
        for name, metrics in rows.items()
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in body)])
