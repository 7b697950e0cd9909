"""The evaluation loop: a predictor over a dataset, scored per image with the KITTI Eigen-split / NYU protocol.

Order of operations per frame: the predictor gives depth at the image's resolution (a trained checkpoint runs at its
training size, see `distill.inference.open_predictor`), the prediction is compared at the ground truth's size; on
native-size KB-cropped frames prediction and ground truth are pasted into the full-size canvas (zeros elsewhere)
before the Garg/Eigen crop, as the KB-crop convention asks; `distill.metrics` masks, aligns, clamps and averages.
With `temporal`, a dataset that knows its camera poses (`camera_pose(index)`, e.g. KITTI drives with OXTS) also
gets the flicker of consecutive frames (`distill.flicker`), on the whole frames as predicted (no crop, no pasting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill.flicker import FlickerAccumulator
from distill.metrics import MetricAccumulator


def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    crop: str | None,
    align: str | None,
    min_depth: float,
    max_depth: float,
    paste_full: bool = False,
    batch_size: int = 1,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    temporal: bool = False,
) -> dict[str, float]:
    """Metrics of a predictor over a dataset (per-image means, see `distill.metrics.MetricAccumulator`).

    Args:
        predict: (B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) depth, e.g. a `distill.inference.Predictor`.
        dataset: samples per distill.data (image, depth, meta with orig_height/orig_width/crop_top/crop_left).
        crop, align: see `distill.metrics.depth_metrics` ("none" or None for neither).
        min_depth, max_depth: metres, valid ground-truth range and prediction clamp.
        paste_full: paste KB-cropped frames into their full-size canvas before cropping.
        batch_size: frames per forward (1 when sizes differ between frames).
        num_workers: DataLoader workers.
        device: where images go before `predict`.
        progress: show a tqdm bar.
        temporal: add "flicker" and "flicker_pairs" when the dataset has camera poses (frames in split order).
    """
    from tqdm import tqdm

    accumulator = MetricAccumulator(min_depth=min_depth, max_depth=max_depth, crop=crop, align=align)
    generator = torch.Generator().manual_seed(0)  # keeps the global RNG untouched (exact training resume)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=generator)
    camera_pose = getattr(dataset, "camera_pose", None) if temporal else None
    flicker = FlickerAccumulator((min_depth, max_depth), align=align)
    index = 0
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        pred = predict(batch["image"].to(device)).float().cpu()
        for i in range(pred.shape[0]):
            meta = {key: value[i] for key, value in batch["meta"].items()}
            pred_i, gt_i = pred[i, 0].numpy(), batch["depth"][i, 0].numpy()
            if camera_pose is not None and (pose := camera_pose(index)) is not None:
                flicker.update(pred_i, gt_i, batch["K"][i].numpy(), pose, str(meta["drive"]), int(meta["frame"]))
            index += 1
            if paste_full:
                pred_i, gt_i = paste_into_full(pred_i, meta), paste_into_full(gt_i, meta)
            accumulator.update(pred_i, gt_i)
    return {**accumulator.result(), **flicker.result()}


def paste_into_full(image: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """(h, w) map of a cropped frame -> (orig_height, orig_width) canvas, zeros outside; unchanged if not cropped."""
    if "orig_height" not in meta:
        return image
    full = (int(meta["orig_height"]), int(meta["orig_width"]))
    top, left = int(meta["crop_top"]), int(meta["crop_left"])
    if full == image.shape:
        return image
    canvas = np.zeros(full, dtype=image.dtype)
    canvas[top : top + image.shape[0], left : left + image.shape[1]] = image
    return canvas
