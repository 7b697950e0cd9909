"""`distill fit BAG [BAG ...] --teacher SPEC --out DIR [key=value ...]`: from robot logs to a deployable student.

One command runs the whole recipe, each stage reusing the verb that does it alone:
1. topics: the camera, its CameraInfo and a LiDAR found by type in the first bag (`fit_topics`);
2. config: DIR/fit.yaml, an ordinary experiment (data.kind: bag, kd.method: FIT_METHOD, every HOLDOUT_EVERY-th
   frame held out) that `distill train DIR/fit.yaml` would also take; `key=value` overrides apply on top;
3. cache: the teacher run once over the training frames (`distill cache`'s `cache_teacher`) into DIR/teacher;
4. train: `distill train` (`run_training`) from the cached teacher into DIR/train, the LiDAR (when the bag has one)
   also supervising as sparse labels (kd.labelfree.lidar_weight);
5. export: FP32 ONNX, with `--int8` also INT8 calibrated on the training frames (`distill export`'s `run_export`)
   into DIR;
6. report: DIR/report.md + report.json + pictures (`fit_report`) on the held-out frames.
DIR/fit.json records the choices and the stages done: `--resume` (or a bare `resume` argument) continues an
interrupted fit with the same size and steps, skipping finished stages, finishing the cache and resuming training
from DIR/train/last.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from distill.config import Config, load_config
from distill.errors import UserError
from distill.verbs.fit_topics import BagTopics, check_bags_exist, find_topics

# kd.method of every fit: label-free KD, the GT-free method benchmarks/results/distill_gain.md measures on unlabeled
# frames of a new domain (AbsRel 0.42 -> 0.18); the one place to change after the distillation benchmark.
FIT_METHOD = "labelfree"
HOLDOUT_EVERY = 10  # every 10th frame is held out for the report, never trained or calibrated on
FIT_LIDAR_WEIGHT = 0.1  # kd.labelfree.lidar_weight when the bag has a LiDAR
MAX_WIDTH = 640  # default training width (pixels): the camera's size scaled down to it, multiples of 32
SIZE_MULTIPLE = 32
STATE_FILE = "fit.json"
PATH_PREFIXES = ("onnx", "hf", "precomputed")  # teacher specs naming a file or folder


def run_fit(
    bags: Sequence[Path | str],
    *,
    teacher: str,
    out: Path | str,
    overrides: Sequence[str] = (),
    image_topic: str | None = None,
    lidar_topic: str | None = None,
    size: tuple[int, int] | None = None,
    steps: int | None = None,
    int8: bool = False,
    resume: bool = False,
) -> Path:
    """Fit a student to the bags (the `distill fit` verb); returns DIR/report.md.

    Args:
        bags: rosbag2 folders, .mcap/.db3 files or ROS 1 .bag files.
        teacher: teacher spec (`onnx:`, `hf:`, `timm:` ...) or a `distill train` checkpoint folder.
        out: DIR, the fit's folder.
        overrides: `key=value` config overrides (as `distill train` takes), applied last.
        image_topic, lidar_topic: override the topics found ("none": no LiDAR).
        size: (H, W) training and export size, pixels; None: the camera's, scaled to MAX_WIDTH.
        steps: optimiser steps; None: the config's train.epochs.
        int8: also export an INT8 model calibrated on the training frames.
        resume: continue the fit in DIR.

    Raises:
        UserError: a missing bag, topic or teacher, a DIR holding another fit, or any config mistake.
    """
    bags, out = [Path(bag) for bag in bags], Path(out)
    check_bags_exist(bags)
    check_teacher_spec(teacher)
    state = _start_state(out, resume, {"bags": [str(b) for b in bags], "teacher": teacher})
    topics = find_topics(bags[0], image_topic, lidar_topic)
    size = size or tuple(state.get("size") or default_size(bags[0], topics))  # a resumed fit keeps its choices
    steps = steps or state.get("steps")
    fit_yaml = write_fit_config(out, bags, topics, size, steps)
    config = load_config(fit_yaml, overrides)
    _print_plan(config, topics, teacher)
    state.update(topics=topics.__dict__, size=list(size), steps=steps)
    _save_state(out, state)

    if "cache" not in state["done"]:
        _cache(config, teacher, out / "teacher")
        _mark_done(out, state, "cache")
    if "train" not in state["done"]:
        resuming = (out / "train" / "last").is_dir()
        from distill.training.run import run_training

        run_training(fit_yaml, [*overrides, f"run.resume={str(resuming).lower()}"])
        _mark_done(out, state, "train")
    students = {name: Path(path) for name, path in state.get("students", {}).items()}
    if "export" not in state["done"] or (int8 and "int8" not in students):
        students = _export(out, config, int8)
        state["students"] = {name: str(path) for name, path in students.items()}
        _mark_done(out, state, "export")
    report = out / "report.md"
    if "report" not in state["done"]:
        from distill.verbs.fit_report import write_report

        write_report(config, teacher=teacher, students=students, out=out, topics=topics)
        _mark_done(out, state, "report")
    print(f"done: {report}")
    return report


def check_teacher_spec(teacher: str) -> None:
    """A teacher file or folder that is missing is one line naming what its folder holds (other mistakes are
    `load_model`'s, raised when the teacher is loaded)."""
    from distill.verbs.fit_topics import folder_listing

    prefix, colon, rest = teacher.partition(":")
    if colon and prefix not in PATH_PREFIXES:
        return  # an architecture name (timm:, hybrid:) or an unknown prefix, which load_model names
    path = Path(rest.split("?", 1)[0]) if colon else Path(teacher)
    if not path.exists():
        raise UserError(f"teacher {teacher}: {path} not found; {folder_listing(path.parent)}")


def default_size(bag: Path, topics: BagTopics) -> tuple[int, int]:
    """The camera's (H, W) scaled to at most MAX_WIDTH wide, each side a multiple of SIZE_MULTIPLE."""
    from distill.data.rosbag import camera_size

    found = camera_size(bag, topics.camera_info)
    if found is None:
        raise UserError(f"no valid CameraInfo on {topics.camera_info} in {bag}; give --size HxW")
    return scaled_size(*found)


def scaled_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) pixels scaled (never up) to at most MAX_WIDTH wide, each side rounded to a multiple of SIZE_MULTIPLE."""
    scale = min(1.0, MAX_WIDTH / width)
    return tuple(max(SIZE_MULTIPLE, round(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in (height, width))


def write_fit_config(out: Path, bags: list[Path], topics: BagTopics, size: tuple[int, int], steps: int | None) -> Path:
    """DIR/fit.yaml: the fit's experiment config, a plain `distill train` config (the teacher is DIR/teacher)."""
    experiment: dict[str, Any] = {
        "run": {"name": "train", "out_dir": str(out.resolve())},
        "data": {
            "kind": "bag", "bags": [str(bag.resolve()) for bag in bags], "image_topic": topics.image,
            "camera_info_topic": topics.camera_info, "lidar_topic": topics.lidar, "size": list(size),
            "holdout_every": HOLDOUT_EVERY, "val_split": None,
        },
        "kd": {"method": FIT_METHOD},
        "teacher": {"spec": f"precomputed:{(out / 'teacher').resolve()}", "weights": None},
    }  # fmt: skip
    if topics.lidar is not None and FIT_METHOD == "labelfree":
        experiment["kd"]["labelfree"] = {"lidar_weight": FIT_LIDAR_WEIGHT}
    if steps is not None:
        experiment["train"] = {"steps": steps, "ckpt_every": max(1, min(steps, 500))}
    path = out / "fit.yaml"
    header = "# written by `distill fit`; `distill train` takes it too (the teacher is the cache in teacher/)\n"
    path.write_text(header + yaml.safe_dump(experiment, sort_keys=False))
    return path


def _start_state(out: Path, resume: bool, choices: dict[str, Any]) -> dict[str, Any]:
    """The fit's state in DIR/fit.json: new (DIR empty or absent), or the earlier one when resuming the same fit."""
    path = out / STATE_FILE
    if resume:
        if not path.is_file():
            raise UserError(f"--resume: {out} holds no fit to resume ({STATE_FILE} missing); run without --resume")
        state = json.loads(path.read_text())
        for key, value in choices.items():
            if state.get(key) != value:
                raise UserError(f"--resume: {out} was fitted with {key} {state.get(key)}, not {value}")
        return state
    if path.is_file():
        raise UserError(f"{out} holds an earlier fit: add --resume to continue it, or give another --out")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    return {**choices, "done": []}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _mark_done(out: Path, state: dict[str, Any], stage: str) -> None:
    state.setdefault("done", [])
    if stage not in state["done"]:
        state["done"].append(stage)
    _save_state(out, state)


def _print_plan(config: Config, topics: BagTopics, teacher: str) -> None:
    data = config.data
    lidar = f"LiDAR {topics.lidar} as sparse labels" if topics.lidar else "no LiDAR"
    length = f"{config.train.steps} steps" if config.train.steps else f"{config.train.epochs} epochs"
    print(f"fit: {topics.image} ({topics.camera_info}), {lidar}; {config.model.arch} at {data.size[0]}x"
          f"{data.size[1]} from {teacher} by kd.method={config.kd.method}, {length}; every "
          f"{data.holdout_every}th frame held out")  # fmt: skip


def _cache(config: Config, teacher: str, folder: Path) -> None:
    """The teacher's depth on the training frames (not the held-out ones), in the precomputed format."""
    from distill.verbs.cache import cache_teacher
    from distill.verbs.fit_report import teacher_config

    count = cache_teacher(teacher_config(config, teacher), folder, [config.data.train_split])
    print(f"teacher cached: {count} new frames in {folder}")


def _export(out: Path, config: Config, int8: bool) -> dict[str, Path]:
    """FP32 (and INT8) ONNX of the trained student in DIR at the training size: precision -> file.

    The training frames (DIR/calibration.yaml: the fit's data section, held-out frames excluded) are the parity
    check's inputs and the INT8 calibration data.
    """
    from distill.verbs.export import run_export

    calibration = out / "calibration.yaml"
    data = config.data.model_dump(mode="json") | {"lidar_topic": None}  # images only
    calibration.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    written = run_export(out / "train", out=out, size=tuple(config.data.size), int8=int8, calib=calibration,
                         force=True)  # fmt: skip
    return dict(zip(("fp32", "int8") if int8 else ("fp32",), written, strict=True))
