"""`distill eval`: a checkpoint or an exported model on a dataset's test split with the KITTI Eigen-split / NYU
protocol (`distill.inference.evaluate`), printed as the papers' table and optionally written as JSON; on sequences
with camera poses (KITTI drives with OXTS, the synthetic world) the flicker of consecutive frames too."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.config import Config, load_config
from distill.errors import UserError
from distill.inference import evaluate, open_predictor
from distill.metrics import format_metrics_table


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
        paste_full=config.data.size is None, device=device, temporal=True,
    )  # fmt: skip
    print(format_metrics_table({Path(checkpoint).name: metrics}))
    print(f"{metrics['count']} frames ({metrics['skipped']} without ground truth), crop {crop}, align {align}")
    if "flicker" in metrics:
        print(f"flicker {metrics['flicker']:.4f}: mean |ln d_t - ln warp(d_t-1)| over {metrics['flicker_pairs']} "
              "consecutive pairs, static pixels seen in both (ego motion from the poses)")  # fmt: skip
    if json_out is not None:
        report = {"checkpoint": str(checkpoint), "data": str(data), "split": config.data.test_split,
                  "crop": crop, "align": align, "metrics": metrics}  # fmt: skip
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    return metrics
