"""The demo's report: pictures of what every model and the live node produced, runs/demo/report.md and report.json.

Pictures (runs/demo/pictures/):
    test_depth.png   per test frame (columns): image, teacher, student, distilled student, ground truth (log colours)
    test_error.png   per test frame: absolute relative error of each model (0 to 0.3, black: no ground truth)
    live_node.png    what the live node published for one replayed frame: image, /depth, /depth/confidence
    live_points.png  that frame's /points cloud (as published, with its packed rgb), rendered from above-behind
    kitti.png        the real KITTI frame: image, distilled student (ONNX), annotated ground truth, error
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from depth_node.geometry import backproject
from distill.drawing import (
    colorize_depth,
    colorize_error,
    densify_for_display,
    display_range,
    grid_footprint,
    labelled,
    mosaic,
    render_cloud,
    write_png,
)
from distill.inference import open_predictor
from distill.verbs.viz import bag_frames

ROLES = ("teacher", "student", "kd")


def _rgb(sample: dict) -> np.ndarray:
    return (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_pictures(settings, runs: dict[str, Path], names: dict[str, str], folder: Path) -> dict[str, Path]:
    """test_depth.png and test_error.png over `settings.pictures` test frames spread over the split."""
    from distill.config import load_data_config
    from distill.data import build_dataset
    from distill.metrics import depth_metrics

    data = {"kind": "kitti", "root": str(settings.out / "data")}
    dataset = build_dataset(load_data_config(data), "test", augment=False)
    indices = np.linspace(0, len(dataset) - 1, min(settings.pictures, len(dataset))).round().astype(int)
    predictors = {role: open_predictor(runs[role]) for role in ROLES}
    depth_columns, error_columns = [], []
    for index in indices:
        sample = dataset[int(index)]
        rgb, gt = _rgb(sample), sample["depth"][0].numpy()
        predictions = {role: predictor.predict(rgb) for role, predictor in predictors.items()}
        vmin, vmax = display_range(gt)
        column = [labelled(rgb, str(sample["meta"]["name"]).split("/")[-1])]
        column += [labelled(colorize_depth(predictions[r], vmin, vmax), names[r]) for r in ROLES]
        depth_columns.append(
            column + [labelled(colorize_depth(gt, vmin, vmax), f"ground truth ({vmin:.0f}-{vmax:.0f} m)")]
        )
        errors = []
        for role in ROLES:
            abs_rel = depth_metrics(predictions[role], gt, crop="garg")["abs_rel"]
            errors.append(labelled(colorize_error(predictions[role], gt), f"{names[role]}: AbsRel {abs_rel:.3f}"))
        error_columns.append([labelled(rgb, "image")] + errors)
    return {
        "test_depth": write_png(folder / "test_depth.png", mosaic(list(zip(*depth_columns)))),
        "test_error": write_png(folder / "test_error.png", mosaic(list(zip(*error_columns)))),
    }


def _messages_at(bag: Path, topics: tuple[str, ...], stamp: tuple[int, int]) -> dict:
    """topic -> the message of that topic with header stamp (sec, nanosec), from a bag."""
    from rosbags.highlevel import AnyReader

    found = {}
    with AnyReader([bag]) as reader:
        wanted = [c for c in reader.connections if c.topic in topics]
        for connection, _, raw in reader.messages(connections=wanted):
            message = reader.deserialize(raw, connection.msgtype)
            if (message.header.stamp.sec, message.header.stamp.nanosec) == stamp:
                found[connection.topic] = message
    return found


def live_pictures(recorded: Path, image_topic: str, folder: Path) -> tuple[dict[str, Path], bool | None]:
    """live_node.png and live_points.png from the middle recorded frame of the live node, and whether that frame's
    /points is the back-projection of its /depth (to 1 mm; None without /points)."""
    from depth_node.codec import pointcloud2_to_xyz
    from depth_node.image_codec import image_to_numpy

    frames = bag_frames(recorded, "/depth", image_topic, None)
    frame = frames[len(frames) // 2]
    stamp = tuple(int(part) for part in frame.name.split("_"))
    messages = _messages_at(recorded, ("/points", "/depth/confidence"), stamp)
    vmin, vmax = display_range(frame.depth)
    tiles = [labelled(frame.rgb, "replayed image")] if frame.rgb is not None else []
    tiles.append(labelled(colorize_depth(frame.depth, vmin, vmax), f"/depth {vmin:.0f}-{vmax:.0f} m"))
    if "/depth/confidence" in messages:
        confidence = np.array(image_to_numpy(messages["/depth/confidence"]), np.float32)
        tiles.append(labelled(colorize_depth(confidence, 0.05, 1.0, "magma"), "/depth/confidence"))
    pictures = {"live_node": write_png(folder / "live_node.png", mosaic([[tile] for tile in tiles]))}
    matches = None
    if "/points" in messages:
        cloud = pointcloud2_to_xyz(messages["/points"], ("x", "y", "z", "rgb"))
        packed = cloud[:, 3].copy().view(np.uint32)  # PCL layout: 0x00RRGGBB stored in a float32
        colors = np.stack([(packed >> shift) & 0xFF for shift in (16, 8, 0)], axis=1).astype(np.uint8)
        # The node's cloud is the back-projection of its /depth: check it, and take each point's patch size from it.
        stride = frame.depth.shape[1] // messages["/points"].width
        grid = backproject(frame.depth, frame.projection, stride)
        valid = np.isfinite(grid).all(axis=2)
        matches = bool(valid.sum() == len(cloud) and np.allclose(grid[valid], cloud[:, :3], atol=1e-3))
        footprint = grid_footprint(grid)[valid] if matches else None
        preview = render_cloud(cloud[:, :3], colors, footprint=footprint)
        pictures["live_points"] = write_png(folder / "live_points.png", preview)
    return pictures, matches


def kitti_picture(kitti: Path, model: Path, folder: Path) -> Path:
    """kitti.png: the real frame, the exported student's depth, the annotated ground truth and the error."""
    from distill.config import load_data_config
    from distill.data import build_dataset

    data = {"kind": "kitti", "root": str(kitti), "raw_root": str(kitti), "gt_root": str(kitti / "data_depth_annotated")}
    sample = build_dataset(load_data_config(data), "test", augment=False)[0]
    rgb, gt = _rgb(sample), sample["depth"][0].numpy()
    depth = open_predictor(model).predict(rgb)
    vmin, vmax = display_range(gt)
    tiles = [labelled(rgb, "KITTI 2011_09_26_drive_0001 image_02 0000000005", 24),
             labelled(colorize_depth(depth, vmin, vmax), f"{model.name} (trained on synthetic data only)", 24),
             labelled(colorize_depth(densify_for_display(gt), vmin, vmax), "annotated ground truth", 24),
             labelled(colorize_error(depth, gt), "abs. rel. error (0-0.3)", 24)]  # fmt: skip
    return write_png(folder / "kitti.png", mosaic([[tile] for tile in tiles]))


def write_report(
    settings, runs: dict[str, Path], results: dict, *, names: dict[str, str], image_topic: str, camera_info_topic: str
) -> Path:
    """Draw the pictures, write report.md and report.json into settings.out; print where everything is.

    Args:
        settings: the demo's settings (out folder, sizes, method).
        runs: run folder per role (teacher, student, kd).
        results: what the demo measured (its stages fill it).
        names: display name per role.
        image_topic, camera_info_topic: the camera topics the live node was fed.
    """
    folder = settings.out / "pictures"
    pictures = test_pictures(settings, runs, names, folder)
    live, results["live"]["points_match_depth"] = live_pictures(Path(results["live"]["output"]), image_topic, folder)
    pictures.update(live)
    if "kitti" in results:
        pictures["kitti"] = kitti_picture(settings.kitti, Path(results["export"]["kd"]), folder)
    results["pictures"] = {name: str(path) for name, path in pictures.items()}
    (settings.out / "report.json").write_text(json.dumps(results, indent=2, default=str))
    report = settings.out / "report.md"
    report.write_text(markdown(settings, results, pictures, camera_info_topic, image_topic))
    print_summary(settings, results, report)
    return report


def _fmt(values, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def markdown(settings, results: dict, pictures: dict[str, Path], info_topic: str, image_topic: str) -> str:
    """report.md: settings, stage times, accuracy, speed, live node, real KITTI, pictures, next commands."""
    rel = {name: Path(path).relative_to(settings.out).as_posix() for name, path in pictures.items()}
    lines = [*_summary(settings, results), *_accuracy_and_speed(settings, results)]
    lines += _live(settings, results, info_topic, image_topic)
    lines += [f"![{name}]({rel[name]})" for name in ("live_node", "live_points") if name in rel] + [""]
    if "kitti" in results:
        lines += [*_kitti(results["kitti"]), f"![kitti]({rel['kitti']})", ""]
    onnx = Path(results["export"]["kd"]).resolve()
    lines += ["## Test frames", "", f"![depth]({rel['test_depth']})", "", f"![error]({rel['test_error']})", "",
              "## Go further", "", "```bash", *next_commands(settings.out, onnx, results), "```", ""]  # fmt: skip
    return "\n".join(lines)


def _summary(settings, results: dict) -> list[str]:
    from datetime import datetime

    height, width = settings.size
    return [
        "# depthkd demo report", "",
        f"{datetime.now():%Y-%m-%d %H:%M}: {results['cpus']} CPU cores, {results['torch_threads']} torch thread(s); "
        f"load average {_fmt(results['load_average_start'])} at the start, {_fmt(results['load_average_end'])} at the "
        f"end; {results['total_s'] / 60:.1f} min in all.",
        f"Synthetic world: {settings.frames} frames at {height}x{width} ({results['data']['frames']}), seed "
        f"{settings.seed}. Steps (batch {settings.batch_size}): teacher {settings.teacher_steps}, student "
        f"{settings.student_steps}, distilled student {settings.kd_steps}; method `{settings.method}`.", "",
        "| stage | wall s | CPU s |", "|---|---:|---:|",
        *(f"| {name} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} |" for name, t in results["stages"].items()), "",
    ]  # fmt: skip


def _accuracy_and_speed(settings, results: dict) -> list[str]:
    from distill.metrics import format_metrics_table

    models, (height, width) = results["models"], settings.size
    return [
        f"## Accuracy on the synthetic test split ({models['kd']['metrics']['count']} frames, Garg crop, metres)", "",
        format_metrics_table({m["name"]: m["metrics"] for m in models.values()}), "",
        "Lower is better for AbsRel to SILog and log10; higher for δ1-δ3. Minutes of CPU training from random init: "
        "the point is the pipeline, not the numbers.", "",
        f"## Speed (ONNX Runtime on this CPU, {height}x{width}, batch 1, median of {settings.bench_runs} runs)", "",
        "| model | params (M) | GFLOPs | median ms | p90 ms |", "|---|---:|---:|---:|---:|",
        *(f"| {models[r]['name']} | {models[r]['params_m']:.2f} | {models[r]['gflops']:.2f} | "
          f"{models[r]['latency_ms']:.1f} | {models[r]['latency_p90_ms']:.1f} |" for r in ("teacher", "kd")),
        "", f"The distilled student runs **{results['speed_ratio']:.2f}x** as fast as its teacher.", "",
    ]  # fmt: skip


def _live(settings, results: dict, info_topic: str, image_topic: str) -> list[str]:
    live = results["live"]
    latencies = np.asarray(live["latencies_ms"] or [np.nan])
    diagnostics = ", ".join(f"{key} {value}" for key, value in live["diagnostics"].items()) or "none heard"
    return [
        "## Live ROS 2 node", "", f"`ROS_DOMAIN_ID={live['domain_id']} {' '.join(live['command'])}`", "",
        f"- {live['frames']} frames of `{results['data']['test_bag']}` replayed at {settings.replay_rate:g}x camera "
        f"rate ({live['duration_s']:.1f} s) on `{image_topic}` + `{info_topic}` with the bag's stamps",
        f"- recorded: {', '.join(f'`{t}` {n}' for t, n in live['received'].items())} messages",
        f"- end to end (publish -> `/depth` received): median {np.median(latencies):.1f} ms, "
        f"p95 {np.percentile(latencies, 95):.1f} ms",
        f"- `/points` is the back-projection of `/depth` with the camera's P (checked to 1 mm on the pictured frame): "
        f"{ {True: 'yes', False: 'NO', None: 'no /points heard'}[live['points_match_depth']] }",
        f"- the node's last diagnostics: {diagnostics}",
        f"- stopped with SIGINT, exit code {live['node_exit_code']}; log `{live['node_log']}`",
        f"- recording: `{live['output']}` (Foxglove, `ros2 bag play`, or `distill viz {live['output']}`)", "",
    ]  # fmt: skip


def _kitti(kitti: dict) -> list[str]:
    from distill.metrics import format_metrics_table

    table = format_metrics_table({"metric (as predicted)": kitti["metrics"], "median-scaled": kitti["metrics_median"]})
    return [f"## Real KITTI frame `{kitti['frame']}` (annotated ground truth, Garg crop)", "", table, "",
            "The student never saw a real image: this measures the synthetic-to-real gap, and the median-scaled row "
            "how much of it is scale.", ""]  # fmt: skip


def next_commands(out: Path, onnx: Path, results: dict) -> list[str]:
    """Commands that take the demo's artefacts further (each printed line is runnable as is)."""
    return [
        f"distill viz {results['live']['output']} --out {out / 'viz'}   # PNGs + PLY clouds of the live recording",
        f"distill viz {out / 'data'} --model {onnx} --out {out / 'viz-test'}   # with ground truth and error maps",
        f"distill bench {onnx}",
        f"depth_node_bag YOUR_BAG OUT_BAG --model {onnx} --params-file config/kitti.yaml   # your own bag, offline",
        f"depth_node --ros-args --params-file config/kitti.yaml -p model:={onnx} "
        "-r image:=/your/camera/image_raw -r camera_info:=/your/camera/camera_info",
        f"ros2 launch depth_node kitti.launch.py model:={onnx}   # on a real ROS 2 install (colcon build ros2_ws)",
        "METHOD=tiekd make demo   # another distillation method (disdepth, tiekd, response, gtfill, labelfree)",
        "distill train config/student-effb0.yaml data.root=/data/kitti data.kb_crop=true   # real KITTI, full size",
    ]


def print_summary(settings, results: dict, report: Path) -> None:
    """Where everything is and what to run next."""
    onnx = Path(results["export"]["kd"]).resolve()
    print(f"report:      {report}  (+ report.json)")
    print(f"pictures:    {settings.out / 'pictures'}")
    print(f"model:       {onnx}")
    print(f"live output: {results['live']['output']}  (node log {results['live']['node_log']})")
    print("next:")
    for command in next_commands(settings.out, onnx, results):
        print(f"  {command}")
