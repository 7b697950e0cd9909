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


def write_report(config: Config, *, teacher: str, students: dict[str, Path], out: Path, topics: BagTopics) -> Path:
    """Compare the exported students with the teacher on the held-out frames; returns DIR/report.md.

    Args:
        config: the fit's resolved config (data: the bags, size and held-out split).
        teacher: the teacher spec the students were distilled from.
        students: precision ("fp32", "int8") -> exported .onnx; the first one is drawn, and a relative teacher is
            aligned to it on frames without LiDAR.
        out: DIR.
        topics: the topics read (for the report's header).
    """
    from distill.data import build_dataset
    from distill.inference.predictors import engine_predictor, model_predictor
    from distill.kd.teacher import load_teacher

    frames = build_dataset(config.data, config.data.test_split, augment=False)
    predictors = {name: engine_predictor(path, backend="onnxruntime") for name, path in students.items()}
    teacher_model = load_teacher(teacher_config(config, teacher), torch.device("cpu"))
    predictors["teacher"] = model_predictor(teacher_model, name=teacher)
    depth_range = (config.data.min_depth, config.data.max_depth)
    scores = {name: _Scores(depth_range) for name in predictors}
    first, pictures = next(iter(students)), []
    for number in tqdm(range(len(frames)), desc="report (held-out frames)", unit="frame"):
        sample = frames[number]
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        depths = {name: scores[name].timed(predictor.predict, rgb) for name, predictor in predictors.items()}
        lidar = sample["sparse_depth"][0].numpy() if "sparse_depth" in sample else None
        depths["teacher"] = _teacher_depth(depths["teacher"], teacher_model.output_kind, depths[first], lidar,
                                           depth_range)  # fmt: skip
        for name, depth in depths.items():
            scores[name].update(depth, depths["teacher"], lidar)
        if number < PICTURES:
            pictures.append(_draw(out / "pictures" / f"holdout_{number:02d}.png", rgb, depths["teacher"],
                                  depths[first], lidar))  # fmt: skip
    results = {
        "method": config.kd.method, "topics": topics.__dict__, "size": list(config.data.size),
        "held_out_frames": len(frames), "holdout_every": config.data.holdout_every,
        "train_steps": config.train.steps,
        "students": {name: {"file": str(path), **scores[name].result(topics.lidar is not None)}
                     for name, path in students.items()},
        "teacher": {"spec": teacher, **scores["teacher"].result(topics.lidar is not None)},
        "pictures": [str(path.relative_to(out)) for path in pictures],
    }  # fmt: skip
    del results["teacher"]["agreement"]  # the teacher against itself
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(results))
    return path


class _Scores:
    """One model's metrics against the teacher and the LiDAR, and its ms per frame."""

    def __init__(self, depth_range: tuple[float, float]) -> None:
        bounds = {"min_depth": depth_range[0], "max_depth": depth_range[1]}
        self.agreement, self.lidar = MetricAccumulator(**bounds), MetricAccumulator(**bounds)
        self.milliseconds: list[float] = []

    def timed(self, call, *args):
        start = time.perf_counter()
        result = call(*args)
        self.milliseconds.append((time.perf_counter() - start) * 1e3)
        return result

    def update(self, depth: np.ndarray, teacher: np.ndarray, lidar: np.ndarray | None) -> None:
        self.agreement.update(depth, teacher)
        if lidar is not None:
            self.lidar.update(depth, lidar)

    def result(self, has_lidar: bool) -> dict[str, Any]:
        """agreement and lidar (AbsRel, RMSE m, δ1, frames; None without reference pixels) and ms_per_frame (the
        median, the first call, a session warm-up, left out when there are others)."""
        return {"agreement": _means(self.agreement), "lidar": _means(self.lidar) if has_lidar else None,
                "ms_per_frame": float(statistics.median(self.milliseconds[1:] or self.milliseconds))}  # fmt: skip


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


def _cells(metrics: dict[str, float] | None) -> str:
    if metrics is None:
        return "– | – | – "
    return f"{metrics['abs_rel']:.3f} | {metrics['rmse']:.2f} | {metrics['d1']:.3f} "


def render_markdown(results: dict[str, Any]) -> str:
    """report.md from the report's results (the same numbers as report.json)."""
    topics, students, teacher = results["topics"], results["students"], results["teacher"]
    lidar = topics["lidar"] is not None
    header = "| model | ms/frame | vs teacher: AbsRel | RMSE (m) | δ1 |" + (
        " vs LiDAR: AbsRel | RMSE (m) | δ1 |" * lidar
    )
    rows = [
        f"| student {name} (`{Path(student['file']).name}`, ONNX Runtime) | {student['ms_per_frame']:.1f} | "
        + _cells(student["agreement"])
        + ("| " + _cells(student["lidar"]) if lidar else "")
        + "|"
        for name, student in students.items()
    ]
    rows.append(f"| teacher | {teacher['ms_per_frame']:.1f} | – | – | – " + ("| " + _cells(teacher["lidar"]) if lidar
                else "") + "|")  # fmt: skip
    lines = [
        "# distill fit report",
        "",
        f"Student ({results['size'][0]}x{results['size'][1]}) distilled from `{teacher['spec']}` by "
        f"`kd.method={results['method']}` on `{topics['image']}`"
        + (f", with the LiDAR `{topics['lidar']}` as sparse labels." if lidar else " (no LiDAR in the bags)."),
        f"Measured on {results['held_out_frames']} held-out frames (every {results['holdout_every']}th frame, never "
        "trained or calibrated on), one frame at a time on this machine. A relative teacher is aligned per frame.",
        "",
        header,
        "| --- " * header.count("|", 1) + "|",
        *rows,
        "",
        f"Top: image, teacher{', LiDAR' * lidar}; bottom: student, its error against the teacher"
        f"{', against the LiDAR' * lidar}:",
        "",
    ]
    lines += [f"![held-out frame {number}]({picture})" for number, picture in enumerate(results["pictures"])]
    return "\n".join(lines) + "\n"
