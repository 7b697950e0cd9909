"""`distill fit`: bags -> cached teacher -> trained student -> ONNX + report, and its one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_data_rosbag import write_bag
from test_kd_tiekd import export_onnx_teacher

from distill.cli import main as distill_main
from distill.data.synth import write_world
from distill.verbs.fit import scaled_size
from distill.verbs.fit_report import render_markdown
from distill.verbs.fit_topics import BagTopics, find_topics

IMAGE_TOPIC = "/kitti/camera_color_left/image_raw"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """12 synthetic frames at 96x320 in three mcap bags (camera, CameraInfo, LiDAR, /tf_static), and an ONNX teacher."""
    root = tmp_path_factory.mktemp("fit") / "world"
    write_world(root, frames=12, seed=0, size=(96, 320), bag="mcap")
    export_onnx_teacher(root / "teacher.onnx")
    return root


def bags(world: Path) -> list[str]:
    return sorted(str(path) for path in (world / "bags").iterdir())


def fit(world: Path, out: Path, *extra: str) -> int:
    quick = ["--steps", "20", "--size", "96x320", "data.holdout_every=4", "data.batch_size=4", "data.num_workers=0",
             "run.device=cpu", "run.tensorboard=false"]  # fmt: skip
    return distill_main(["fit", *bags(world), "--teacher", f"onnx:{world / 'teacher.onnx'}", "--out", str(out),
                         *quick, *extra])  # fmt: skip


@pytest.mark.slow
def test_fit_runs_end_to_end_and_resumes(world, tmp_path, capsys):
    out = tmp_path / "fit"
    assert fit(world, out, "--int8") == 0
    printed = capsys.readouterr().out
    assert f"fit: {IMAGE_TOPIC}" in printed and "LiDAR /kitti/velo/pointcloud as sparse labels" in printed
    state = json.loads((out / "fit.json").read_text())
    assert state["done"] == ["cache", "train", "export", "report"]
    assert len(list((out / "teacher").glob("*.npy"))) == 9  # 12 frames, every 4th held out: never cached
    assert "lidar" in (out / "train" / "train.csv").read_text().splitlines()[0]  # the LiDAR supervised too

    onnx_files = sorted(out.glob("*.onnx"))
    assert [path.name for path in onnx_files] == ["efficientnet_b0_96x320.onnx", "efficientnet_b0_96x320_int8.onnx"]
    image = np.random.default_rng(0).random((1, 3, 96, 320), dtype=np.float32)
    for path in onnx_files:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        depth = session.run(["depth"], {session.get_inputs()[0].name: image})[0]
        assert depth.shape == (1, 1, 96, 320) and np.isfinite(depth).all() and (depth > 0).all()

    report = json.loads((out / "report.json").read_text())
    assert report["held_out_frames"] == 3 and report["method"] == "labelfree"
    assert list(report["students"]) == ["fp32", "int8"]
    for student in report["students"].values():
        assert 0 <= student["agreement"]["abs_rel"] < 1 and 0 <= student["agreement"]["d1"] <= 1
        assert student["agreement"]["frames"] == 3 and student["lidar"]["frames"] == 3
        assert student["ms_per_frame"] > 0
    assert report["teacher"]["ms_per_frame"] > 0 and report["teacher"]["lidar"]["frames"] == 3
    markdown = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(linked) == 3 and all((out / picture).stat().st_size > 1000 for picture in linked)
    fp32 = report["students"]["fp32"]
    assert f"| {fp32['ms_per_frame']:.1f} | {fp32['agreement']['abs_rel']:.3f} | {fp32['agreement']['rmse']:.2f} |" in (
        markdown
    )

    # An interrupted fit (training not finished) resumes: the cache is complete, training continues from `last`.
    state["done"] = ["cache"]
    (out / "fit.json").write_text(json.dumps(state))
    assert fit(world, out, "--int8", "resume") == 0
    printed = capsys.readouterr().out
    assert "resuming at step 20" in printed and "teacher cached" not in printed
    assert json.loads((out / "fit.json").read_text())["done"] == ["cache", "train", "export", "report"]


def test_topics_are_found_by_type(tmp_path):
    path = write_bag(tmp_path / "log", "mcap")  # /cam/image, /cam/info, /velo: no kitti2bag names
    assert find_topics(path) == BagTopics("/cam/image", "/cam/info", "/velo")
    assert find_topics(path, lidar_topic="none") == BagTopics("/cam/image", "/cam/info", None)


def test_default_size_keeps_the_aspect_at_most_640_wide():
    assert scaled_size(375, 1242) == (192, 640)  # KITTI
    assert scaled_size(720, 1280) == (352, 640)
    assert scaled_size(480, 640) == (480, 640) and scaled_size(100, 300) == (96, 288)  # never scaled up


def test_report_without_lidar_has_no_lidar_columns():
    scores = {"agreement": {"abs_rel": 0.1234, "rmse": 1.5, "d1": 0.9, "frames": 4}, "lidar": None}
    results = {
        "method": "labelfree", "topics": {"image": "/cam", "camera_info": "/cam_info", "lidar": None},
        "size": [96, 320], "held_out_frames": 4, "holdout_every": 10, "train_steps": 20,
        "students": {"fp32": {"file": "/fit/student.onnx", "ms_per_frame": 12.34, **scores}},
        "teacher": {"spec": "onnx:t.onnx", "lidar": None, "ms_per_frame": 99.0}, "pictures": ["pictures/a.png"],
    }  # fmt: skip
    markdown = render_markdown(results)
    assert "| student fp32 (`student.onnx`, ONNX Runtime) | 12.3 | 0.123 | 1.50 | 0.900 |" in markdown
    assert "| teacher | 99.0 | – | – | – |" in markdown and "LiDAR" not in markdown.replace("no LiDAR", "")
    assert "![held-out frame 0](pictures/a.png)" in markdown


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--image-topic", "/camera/foo"], rf"no image topic /camera/foo in \S+_0001; image topics: {IMAGE_TOPIC}$"),
        (["--lidar-topic", "/velo"], r"no LiDAR topic /velo in \S+; PointCloud2 topics: /kitti/velo/pointcloud$"),
        (["--resume"], r"--resume: \S+ holds no fit to resume \(fit.json missing\); run without --resume$"),
    ],
)
def test_mistakes_are_one_line(world, tmp_path, capsys, arguments, message):
    assert fit(world, tmp_path / "fit", *arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and re.search(message, error), error


def test_missing_bag_teacher_and_earlier_fit_are_one_line(world, tmp_path, capsys):
    teacher = f"onnx:{world / 'teacher.onnx'}"
    missing_bag = str(world / "bags" / "drive_0009")
    assert distill_main(["fit", missing_bag, "--teacher", teacher, "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(f"no rosbag {missing_bag}; {world / 'bags'} holds: 2030_01_01_drive_0001/, "
                          "2030_01_01_drive_0002/, 2030_01_01_drive_0003/")  # fmt: skip

    missing_teacher = world / "teachers" / "big.onnx"
    assert distill_main(["fit", *bags(world), "--teacher", f"onnx:{missing_teacher}", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(f"{missing_teacher} not found; {missing_teacher.parent} does not exist either")

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fit.json").write_text("{}")
    assert distill_main(["fit", *bags(world), "--teacher", teacher, "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds an earlier fit: add --resume to continue it" in error
