"""`distill eval`: the KITTI Eigen-split / NYU protocol (`distill.metrics`) on a checkpoint or an exported ONNX model.

Order of operations per frame: the model predicts at its training size (a checkpoint's data.size, else the image's size
padded up to a multiple of its size divisor), the prediction is resized bilinearly to the ground truth's size; on
native-size KB-cropped frames prediction and ground truth are then pasted into the full-size canvas (zeros elsewhere)
before the Garg/Eigen crop, as the KB-crop convention asks; `distill.metrics` masks, aligns, clamps and averages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill.config import Config, load_config
from distill.errors import UserError
from distill.inference import open_predictor
from distill.metrics import MetricAccumulator, format_metrics_table


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
    """
    from tqdm import tqdm

    accumulator = MetricAccumulator(min_depth=min_depth, max_depth=max_depth, crop=crop, align=align)
    generator = torch.Generator().manual_seed(0)  # keeps the global RNG untouched (exact training resume)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=generator)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        pred = predict(batch["image"].to(device)).float().cpu()
        for i in range(pred.shape[0]):
            meta = {key: value[i] for key, value in batch["meta"].items()}
            pred_i, gt_i = pred[i, 0].numpy(), batch["depth"][i, 0].numpy()
            if paste_full:
                pred_i, gt_i = paste_into_full(pred_i, meta), paste_into_full(gt_i, meta)
            accumulator.update(pred_i, gt_i)
    return accumulator.result()


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


def data_config(data: str | Path) -> Config:
    """The config whose data section `--data` means: a config YAML, or a dataset folder (KITTI layout / synth)."""
    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        return load_config(path)
    if path.is_dir():
        return load_config(None, [f"data.root={json.dumps(str(path))}", "data.kind=kitti"])  # quoted: any path is YAML
    raise UserError(f"--data: {data} is neither a config YAML nor a dataset folder")


def run_eval(
    checkpoint: Path | str,
    data: str | Path,
    crop: str | None = None,
    align: str | None = None,
    json_out: Path | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint (folder, run folder) or an exported `.onnx` on the test split; print the table.

    Args:
        checkpoint: checkpoint/run folder or .onnx file.
        data: config YAML (its data section and eval defaults) or dataset folder (KITTI layout).
        crop: garg | eigen | nyu | none; None: the config's eval.crop, else by dataset kind.
        align: none | median | lsq; None: the config's eval.align.
        json_out: also write {"checkpoint", "data", "split", "crop", "align", "metrics"} here.

    Returns:
        The metrics (per-image means plus count/skipped).
    """
    from distill.data import build_dataset

    config = data_config(data)
    crop = crop or config.eval.crop or config.data.eval_crop
    align = align or config.eval.align
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predict = open_predictor(checkpoint, device, backend="onnxruntime")
    output_kind = predict.output_kind
    if output_kind != "metric" and align == "none":
        print(f"note: {checkpoint} predicts {output_kind}; metrics without --align median|lsq are not in metres")
    dataset = build_dataset(config.data, config.data.test_split, augment=False)
    min_depth, max_depth = config.data.min_depth, config.data.max_depth
    metrics = evaluate(
        predict, dataset, crop=crop, align=align, min_depth=min_depth, max_depth=max_depth,
        paste_full=config.data.size is None, device=device,
    )  # fmt: skip
    print(format_metrics_table({Path(checkpoint).name: metrics}))
    print(f"{metrics['count']} frames ({metrics['skipped']} without ground truth), crop {crop}, align {align}")
    if json_out is not None:
        report = {"checkpoint": str(checkpoint), "data": str(data), "split": config.data.test_split,
                  "crop": crop, "align": align, "metrics": metrics}  # fmt: skip
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    return metrics
