"""The report of `distill fit`: how well the exported student agrees with its teacher, and with the LiDAR.

On the held-out bag frames (never trained on), at the training size:
- agreement: AbsRel and δ1 of the student's depth against the teacher's (a relative teacher is first least-squares
  aligned per frame, to the LiDAR where the frame has points, else to the student);
- LiDAR: AbsRel, RMSE, δ1 of the student and of the teacher against the projected LiDAR points, when the bag has one;
- speed: median ms/frame of the exported student through ONNX Runtime (the depth_node engine: preprocess,
  inference, postprocess) and of the teacher through its predictor, one frame at a time on this machine;
- pictures: image | teacher | student | student-vs-teacher error (| LiDAR) for the first frames.
Written as DIR/report.md, DIR/report.json and DIR/pictures/*.png.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distill.config import Config
from distill.drawing import (
    colorize_depth,
    colorize_error,
    densify_for_display,
    display_range,
    labelled,
    mosaic,
    write_png,
)
from distill.errors import UserError
from distill.kd.alignment import align_to_reference
from distill.metrics import MetricAccumulator
from distill.verbs.fit_topics import BagTopics

PICTURES = 3  # held-out frames drawn
MIN_LIDAR_POINTS = 20  # a frame with fewer projected points aligns a relative teacher to the student instead
REPORT_KEYS = ("abs_rel", "rmse", "d1")


def teacher_config(config: Config, teacher: str) -> Config:
    """The fit's config with the live teacher in place of its cache (a folder: a `distill train` checkpoint)."""
    live = config.model_copy(deep=True)
    live.teacher.spec, live.teacher.weights = teacher, None
    if Path(teacher).is_dir():
        live.teacher.spec, live.teacher.weights = None, Path(teacher)
    return live


def write_report(config: Config, *, teacher: str, student: Path, out: Path, topics: BagTopics) -> Path:
    """Compare the exported student with the teacher on the held-out frames; returns DIR/report.md.

    Args:
        config: the fit's resolved config (data: the bags, size and held-out split).
        teacher: the teacher spec the student was distilled from.
        student: the exported .onnx.
        out: DIR.
        topics: the topics read (for the report's header).
    """
    from distill.data import build_dataset
    from distill.inference.predictors import engine_predictor, model_predictor
    from distill.kd.teacher import load_teacher

    frames = build_dataset(config.data, config.data.test_split, augment=False)
    student_predictor = engine_predictor(student, backend="onnxruntime")
    teacher_model = load_teacher(teacher_config(config, teacher), torch.device("cpu"))
    teacher_predictor = model_predictor(teacher_model, name=teacher)
    depth_range = (config.data.min_depth, config.data.max_depth)
    accumulators = {name: MetricAccumulator(min_depth=depth_range[0], max_depth=depth_range[1])
                    for name in ("agreement", "student_lidar", "teacher_lidar")}  # fmt: skip
    timings: dict[str, list[float]] = {"student": [], "teacher": []}
    pictures = []
    for number in tqdm(range(len(frames)), desc="report (held-out frames)", unit="frame"):
        sample = frames[number]
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        student_depth = _timed(timings["student"], student_predictor.predict, rgb)
        raw = _timed(timings["teacher"], teacher_predictor.predict, rgb)
        lidar = sample["sparse_depth"][0].numpy() if "sparse_depth" in sample else None
        teacher_depth = _teacher_depth(raw, teacher_model.output_kind, student_depth, lidar, depth_range)
        accumulators["agreement"].update(student_depth, teacher_depth)
        if lidar is not None:
            accumulators["student_lidar"].update(student_depth, lidar)
            accumulators["teacher_lidar"].update(teacher_depth, lidar)
        if number < PICTURES:
            pictures.append(_draw(out / "pictures" / f"holdout_{number:02d}.png", rgb, teacher_depth, student_depth,
                                  lidar))  # fmt: skip
    results = {
        "teacher": teacher, "student": str(student), "method": config.kd.method,
        "topics": topics.__dict__, "size": list(config.data.size), "held_out_frames": len(frames),
        "holdout_every": config.data.holdout_every, "train_steps": config.train.steps,
        "agreement": _means(accumulators["agreement"]),
        "lidar": None if topics.lidar is None else {
            "student": _means(accumulators["student_lidar"]), "teacher": _means(accumulators["teacher_lidar"])},
        "ms_per_frame": {"student_onnxruntime": _median(timings["student"]), "teacher": _median(timings["teacher"])},
        "pictures": [str(path.relative_to(out)) for path in pictures],
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(results))
    return path


def _timed(into: list[float], call, *args):
    start = time.perf_counter()
    result = call(*args)
    into.append((time.perf_counter() - start) * 1e3)
    return result


def _median(milliseconds: list[float]) -> float:
    """Median ms, the first call (session warm-up) left out when there are others."""
    return float(statistics.median(milliseconds[1:] or milliseconds))


def _teacher_depth(raw: np.ndarray, kind: str, student: np.ndarray, lidar: np.ndarray | None,
                   depth_range: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """(H, W) teacher depth, metres: metric as it is, relative aligned to the LiDAR (enough points) or the student."""
    if kind == "metric":
        return raw
    use_lidar = lidar is not None and int((lidar > 0).sum()) >= MIN_LIDAR_POINTS
    reference = lidar if use_lidar else student
    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array, np.float32))[None, None]  # noqa: E731
    mask = as_tensor(reference) > 0
    aligned = align_to_reference(as_tensor(raw), kind, as_tensor(reference), mask, depth_range)
    return aligned[0, 0].numpy()


def _means(accumulator: MetricAccumulator) -> dict[str, float] | None:
    """The report's metrics (AbsRel, RMSE m, δ1) and frame count; None when no frame had a reference pixel."""
    try:
        result = accumulator.result()
    except UserError:
        return None
    return {key: result[key] for key in REPORT_KEYS} | {"frames": result["count"]}


def _draw(path: Path, rgb: np.ndarray, teacher: np.ndarray, student: np.ndarray, lidar: np.ndarray | None) -> Path:
    vmin, vmax = display_range(teacher, student, *([] if lidar is None else [lidar]))
    top = [labelled(rgb, "image"), labelled(colorize_depth(teacher, vmin, vmax), "teacher")]
    bottom = [labelled(colorize_depth(student, vmin, vmax), "student"),
              labelled(colorize_error(student, teacher), "|student - teacher| / teacher (0..0.3)")]  # fmt: skip
    if lidar is not None:
        top.append(labelled(colorize_depth(densify_for_display(lidar), vmin, vmax), "LiDAR"))
        bottom.append(labelled(colorize_error(student, densify_for_display(lidar)), "|student - LiDAR| / LiDAR"))
    return write_png(path, mosaic([top, bottom]))


def _row(name: str, metrics: dict[str, float] | None) -> str:
    if metrics is None:
        return f"| {name} | no reference pixels | | | |"
    return (f"| {name} | {metrics['abs_rel']:.3f} | {metrics['rmse']:.2f} | {metrics['d1']:.3f} | "
            f"{metrics['frames']} |")  # fmt: skip


def render_markdown(results: dict[str, Any]) -> str:
    """report.md from the report's results (the same numbers as report.json)."""
    topics, speed = results["topics"], results["ms_per_frame"]
    lines = [
        "# distill fit report",
        "",
        f"Student `{Path(results['student']).name}` ({results['size'][0]}x{results['size'][1]}), distilled from "
        f"`{results['teacher']}` by `kd.method={results['method']}` on `{topics['image']}`"
        + (f" with the LiDAR `{topics['lidar']}` as sparse labels." if topics["lidar"] else " (no LiDAR)."),
        f"Measured on {results['held_out_frames']} held-out frames (every {results['holdout_every']}th, never "
        "trained on).",
        "",
        "## Agreement",
        "",
        "| student against | AbsRel | RMSE (m) | δ1 | frames |",
        "| --- | --- | --- | --- | --- |",
        _row("teacher", results["agreement"]),
    ]
    if results["lidar"] is not None:
        lines += [
            _row("LiDAR", results["lidar"]["student"]),
            _row("(teacher against LiDAR)", results["lidar"]["teacher"]),
        ]
    lines += [
        "",
        "## Speed (ms/frame, one frame at a time on this machine)",
        "",
        "| model | ms/frame |",
        "| --- | --- |",
        f"| student, ONNX Runtime | {speed['student_onnxruntime']:.1f} |",
        f"| teacher | {speed['teacher']:.1f} |",
        "",
        "## Pictures",
        "",
    ]
    lines += [f"![held-out frame {number}]({picture})" for number, picture in enumerate(results["pictures"])]
    return "\n".join(lines) + "\n"
