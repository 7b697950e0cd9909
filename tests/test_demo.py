"""`make demo` end to end at a seconds-scale size: world, three trainings, export, eval, the live node, the report."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from distill.errors import UserError
from distill.verbs.demo import MARKER, DemoSettings, StageFailed, Stages, main, prepare_output, run_demo

IMAGE_TOPIC = "/kitti/camera_color_left/image_raw"
BAR = 18  # title bar of each picture tile (distill.verbs.viz.labelled)
GAP = 4  # pixels between tiles (distill.verbs.viz.mosaic)


def test_stages_time_each_stage_and_wrap_failures(capsys):
    stages = Stages(["a", "b"])
    with stages.run("a"):
        pass
    with pytest.raises(StageFailed, match="stage 'b' failed: boom") as failure:
        with stages.run("b"):
            raise ValueError("boom")
    assert failure.value.title == "b" and isinstance(failure.value.error, ValueError)
    assert list(stages.durations) == ["a"] and set(stages.durations["a"]) == {"wall_s", "cpu_s"}
    assert "[1/2] a: done in" in capsys.readouterr().out


def test_prepare_output_replaces_only_a_demo_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not made by the demo"):
        prepare_output(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    demo = tmp_path / "demo"
    prepare_output(demo)
    (demo / "old.txt").write_text("previous run")
    prepare_output(demo)
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]


def test_unknown_method_fails_before_any_work(tmp_path, capsys):
    settings = DemoSettings.tiny(tmp_path / "demo", method="disdeph")
    assert main(settings) == 1
    assert "did you mean 'disdepth'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_a_failing_stage_stops_the_demo_with_its_name(tmp_path, capsys):
    settings = DemoSettings.tiny(tmp_path / "demo")
    assert main(replace(settings, size=(8, 8))) == 1  # too small for the synthetic camera
    err = capsys.readouterr().err
    assert "stage 'synthetic world' failed" in err and "--size 8x8 is out of range" in err
    assert not (tmp_path / "demo" / "teacher").exists()


def picture_shape(path) -> tuple[int, ...]:
    picture = cv2.imread(str(path))
    assert picture is not None, f"{path} does not decode"
    return picture.shape


@pytest.mark.slow
@pytest.mark.ros
def test_tiny_demo_end_to_end(tmp_path, shared_data):
    settings = DemoSettings.tiny(tmp_path / "demo")
    assert settings.kitti == shared_data / "kitti_raw_sample"
    results = run_demo(settings)
    out, (height, width) = settings.out, settings.size

    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "kd", "kd_onnx"}
    for model in report["models"].values():
        assert 0 < model["metrics"]["abs_rel"] < 100 and model["metrics"]["count"] == report["data"]["frames"]["test"]
    # the exported student scores what its checkpoint scores (same frames, ONNX Runtime vs PyTorch)
    assert report["models"]["kd_onnx"]["metrics"]["abs_rel"] == pytest.approx(
        report["models"]["kd"]["metrics"]["abs_rel"], rel=1e-3
    )
    assert report["speed_ratio"] > 0 and report["kitti"]["metrics"]["count"] == 1
    assert set(report["stages"]) == {"synthetic world", "teacher + student baseline", "distilled student (disdepth)",
                                     "export to ONNX", "evaluate", "live ROS 2 node", "real KITTI frame"}  # fmt: skip
    assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 for t in report["stages"].values())

    live = results["live"]
    assert live["node_exit_code"] == 0 and report["live"]["points_match_depth"] is True
    frames = report["data"]["frames"]["test"]
    assert live["frames"] == frames
    text = (out / "report.md").read_text()
    for needle in ("teacher (ViT)", "student + disdepth", "exit code 0", "pictures/test_depth.png", "x** as fast"):
        assert needle in text

    pictures = out / "pictures"
    tile = height + BAR
    assert picture_shape(pictures / "test_depth.png") == (5 * tile + 4 * GAP, 2 * width + GAP, 3)
    assert picture_shape(pictures / "test_error.png") == (4 * tile + 3 * GAP, 2 * width + GAP, 3)
    assert picture_shape(pictures / "live_node.png") == (3 * tile + 2 * GAP, width, 3)
    assert picture_shape(pictures / "live_points.png") == (360, 640, 3)
    assert picture_shape(pictures / "kitti.png") == (4 * (375 + 24) + 3 * GAP, 1242, 3)

    with AnyReader([out / "live" / "recorded"]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        assert counts[IMAGE_TOPIC] == frames
        assert 1 <= counts["/depth"] <= frames and 1 <= counts["/points"] <= frames
        depth_connection = next(c for c in reader.connections if c.topic == "/depth")
        points_connection = next(c for c in reader.connections if c.topic == "/points")
        for connection, _, raw in reader.messages(connections=[depth_connection, points_connection]):
            message = reader.deserialize(raw, connection.msgtype)
            assert (message.height, message.width) == (height, width)
            if connection.topic == "/depth":
                depth = np.frombuffer(message.data, np.float32)
                assert message.encoding == "32FC1" and np.isfinite(depth).any()
            else:
                assert [f.name for f in message.fields] == ["x", "y", "z", "rgb"]
