"""The depth node on a real rclpy graph (PyPI ROS 2 + Fast DDS): outputs, REP 117 states, the cloud's geometry,
camera_info scaling, malformed input, keep-latest accounting, diagnostics, laziness, and the `depth_node` console
script with the KITTI params file on the real KITTI frame.

In-process tests share one DepthNode running a closed-form ONNX model (depth = red/255 + 1 m), so every published
value is known; one runs a static INT8 student against its FP32 model; the console-script test runs a freshly
exported EfficientNet-B0 student in a subprocess.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
from node_fixtures import (
    Probe,
    assert_cloud_is_backprojection,
    camera_info_msg,
    depth_array,
    exported_int8_student,
    exported_student,
    image_msg,
    jpeg_bomb,
    kitti_frame,
    make_header,
    png_bomb,
    ramp_image,
    ramp_model,
    spin_until,
)
from rclpy.parameter import Parameter

from depth_node.engine import open_engine
from depth_node.frame_slot import FrameSlot
from depth_node.node import DepthNode

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 48, 64
K_FULL = np.array([[100.0, 0.0, 63.5], [0.0, 100.0, 47.5], [0.0, 0.0, 1.0]])  # for a 128x96 camera: 2x the image
MIN_DEPTH, MAX_DEPTH = 1.2, 1.8


def node_parameters(model: Path, **values) -> list[Parameter]:
    values = {"model": str(model), "sub_reliability": "reliable", "diagnostics_period": 0.2} | values
    return [Parameter(name, value=value) for name, value in values.items()]


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """(node, lazy node, probe): one DepthNode with a ramp model, one with nobody listening, a probe node."""
    model = ramp_model(tmp_path_factory.mktemp("ramp") / "ramp.onnx", size=(HEIGHT, WIDTH))
    context = rclpy.Context()
    rclpy.init(context=context)
    node = DepthNode(
        context=context, parameter_overrides=node_parameters(model, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH)
    )
    lazy = DepthNode(context=context, namespace="nobody_listens", parameter_overrides=node_parameters(model))
    probe = Probe(context, extra_nodes=[node, lazy])
    yield node, lazy, probe
    probe.close()
    for each in (node, lazy):
        each.destroy_node()
    context.try_shutdown()


class Stamps:
    """Distinct stamps per test (outputs are recorded by stamp)."""

    next_ns = 1_000_000_000

    @classmethod
    def new(cls) -> int:
        cls.next_ns += 100_000_000
        return cls.next_ns


def publish_until_output(probe: Probe, rgb, info, topics=("depth", "depth/camera_info", "points"), **kwargs) -> int:
    stamp = Stamps.new()
    spin_until(
        lambda: all(probe.get(t, stamp) for t in topics), lambda: probe.publish_frame(rgb, info, stamp, **kwargs)
    )
    return stamp


def test_depth_points_and_camera_info_from_one_frame(graph):
    node, _, probe = graph
    rgb = ramp_image(HEIGHT, WIDTH)
    stamp = publish_until_output(probe, rgb, camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0))
    depth_msg, info, points = (probe.get(t, stamp) for t in ("depth", "depth/camera_info", "points"))
    for msg in (depth_msg, info, points):
        assert msg.header.frame_id == "camera_optical"
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == stamp
    assert (depth_msg.encoding, depth_msg.height, depth_msg.width) == ("32FC1", HEIGHT, WIDTH)
    # REP 117: the model gives red/255 + 1 m; below min_depth -Inf, beyond max_depth +Inf, finite in between.
    depth, expected = depth_array(depth_msg), rgb[..., 0] / 255.0 + 1.0
    inside = (expected > MIN_DEPTH + 1e-3) & (expected < MAX_DEPTH - 1e-3)
    np.testing.assert_allclose(depth[inside], expected[inside], atol=1e-4)
    assert (
        np.isneginf(depth[expected < MIN_DEPTH - 1e-3]).all() and np.isposinf(depth[expected > MAX_DEPTH + 1e-3]).all()
    )
    # camera_info describes the published 64x48 image: K and P halved (pixel centres at integers).
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    np.testing.assert_allclose(np.reshape(info.k, (3, 3)), [[50, 0, 31.5], [0, 50, 23.5], [0, 0, 1]])
    np.testing.assert_allclose(np.reshape(info.p, (3, 4))[:, :3], np.reshape(info.k, (3, 3)))
    assert (points.height, points.width, points.is_dense) == (HEIGHT, WIDTH, False)
    assert [f.name for f in points.fields] == ["x", "y", "z"]
    assert assert_cloud_is_backprojection(depth_msg, info, points) == inside.sum()
    assert probe.get("depth/confidence", stamp) is None  # this model has no bins


@pytest.mark.slow
@pytest.mark.parametrize(
    ("problem", "make_image", "warning"),
    [
        (
            "unsupported encoding",
            lambda rgb, s: _with(image_msg(rgb, s), encoding="xyz16"),
            "unsupported image encoding",
        ),
        (
            "measurement encoding",
            lambda rgb, s: image_msg(rgb[..., 0].astype(np.float32), s, encoding="32FC1"),
            "holds measurements",
        ),
        ("zero size", lambda rgb, s: _with(image_msg(rgb, s), height=0, width=0, data=b""), "zero-size image"),
        (
            "truncated data",
            lambda rgb, s: _with(image_msg(rgb, s), data=bytes(image_msg(rgb, s).data)[:-7]),
            "truncated image",
        ),
        ("step too small", lambda rgb, s: _with(image_msg(rgb, s), step=WIDTH * 3 - 1), "step"),
        (
            "a forged megabyte-long encoding",
            lambda rgb, s: _with(image_msg(rgb, s), encoding="\n[FATAL] forged" + "x" * 2**20),
            "frame skipped: unsupported image encoding '\\n[FATAL] forgedxxx",
        ),
        (
            "over the pixel limit",
            lambda rgb, s: _with(image_msg(rgb, s), height=9000, width=9000, step=27000),
            "frame skipped: image is 9000x9000 (81.0 MP), more than max_image_pixels=40000000",
        ),
    ],
)
def test_a_malformed_image_is_skipped_with_a_warning_and_the_next_is_processed(graph, problem, make_image, warning):
    node, _, probe = graph
    rgb, info = ramp_image(HEIGHT, WIDTH), camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0)
    publish_until_output(probe, rgb, info)  # the node has this camera_info
    bad_stamp, bad_before = Stamps.new(), node.counters.bad_input
    spin_until(
        lambda: probe.warnings(warning) and node.counters.bad_input > bad_before,
        lambda: probe.pub_image.publish(make_image(rgb, bad_stamp)),
    )
    publish_until_output(probe, rgb, info)
    assert probe.get("depth", bad_stamp) is None and probe.get("depth/camera_info", bad_stamp) is None, problem
    assert all(len(line) < 1000 and "\n" not in line for line in probe.warnings(warning)), problem


def test_nan_intrinsics_skip_the_frame_and_valid_ones_resume(graph):
    node, _, probe = graph
    rgb = ramp_image(HEIGHT, WIDTH)
    bad_info = camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0)
    bad_info.k[0] = bad_info.p[0] = math.nan
    probe.pub_info.publish(bad_info)
    spin_until(
        lambda: node.stream.camera_info is not None and math.isnan(node.stream.camera_info.k[0]),
        lambda: probe.pub_info.publish(bad_info),
    )
    bad_stamp = Stamps.new()
    spin_until(lambda: probe.warnings("NaN"), lambda: probe.pub_image.publish(image_msg(rgb, bad_stamp)))
    assert probe.get("depth", bad_stamp) is None
    publish_until_output(probe, rgb, camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0))


def test_the_newest_frame_of_a_burst_is_processed_and_every_frame_is_accounted_for(graph):
    node, _, probe = graph
    rgb, info = ramp_image(HEIGHT, WIDTH), camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0)
    publish_until_output(probe, rgb, info)
    before = dict(vars(node.counters))
    stamps = [Stamps.new() for _ in range(20)]
    for stamp in stamps:
        probe.publish_frame(rgb, info, stamp)
    spin_until(lambda: probe.get("depth", stamps[-1]) is not None, timeout=10)  # keep-latest: the last is never lost
    spin_until(lambda: _settled(node), timeout=10)
    delta = {key: value - before[key] for key, value in vars(node.counters).items()}
    # DDS itself keeps only the latest sample (keep-last 1), so fewer than 20 may reach the node; each that does is
    # published or counted as dropped, never queued.
    assert 1 <= delta["frames_in"] <= len(stamps) and delta["frames_out"] + delta["dropped"] == delta["frames_in"]
    assert 1 <= sum(probe.get("depth", s) is not None for s in stamps) <= delta["frames_out"]


def _settled(node: DepthNode) -> bool:
    counters = node.counters
    return counters.frames_out + counters.dropped + counters.bad_input + counters.no_camera_info + counters.idle >= (
        counters.frames_in
    )


def test_frame_slot_keeps_only_the_newest_frame():
    slot = FrameSlot()
    assert slot.take(timeout=0.01) is None
    assert [slot.put(n) for n in range(3)] == [False, True, True]  # two frames replaced: dropped
    assert slot.take(timeout=0.01) == 2 and slot.take(timeout=0.01) is None
    slot.close()
    assert slot.closed and slot.take(timeout=5.0) is None


def test_diagnostics_report_stage_latencies_and_frame_counters(graph):
    node, _, probe = graph
    publish_until_output(probe, ramp_image(HEIGHT, WIDTH), camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0))
    wanted = {
        f"{stage}_ms_p50"
        for stage in ("decode", "preprocess", "inference", "postprocess", "cloud", "messages", "publish")
    }

    def latest() -> dict[str, str]:
        arrays = [a for a in probe.diagnostics if a.status and a.status[0].name == "depth_node: pipeline"]
        return {kv.key: kv.value for kv in arrays[-1].status[0].values} if arrays else {}

    spin_until(lambda: wanted <= set(latest()) and int(latest().get("frames_out", 0)) >= 1, timeout=10)
    values = latest()
    assert all(float(values[key]) >= 0 for key in wanted | {"total_ms_p50"})
    assert {"frames_in", "frames_out", "dropped", "bad_input"} <= set(values)


def test_a_lazy_node_runs_no_inference_while_nobody_subscribes(graph):
    _, lazy, probe = graph
    image_topic = lazy.resolve_topic_name("image")
    publisher = probe.node.create_publisher(type(image_msg(ramp_image(2, 2), 0)), image_topic, 10)
    info_publisher = probe.node.create_publisher(
        type(camera_info_msg(K_FULL, 1, 1, 0)), lazy.resolve_topic_name("camera_info"), 10
    )
    rgb, info = ramp_image(HEIGHT, WIDTH), camera_info_msg(K_FULL, WIDTH, HEIGHT, 0)

    def publish() -> None:
        info_publisher.publish(info)
        publisher.publish(image_msg(rgb, Stamps.new()))

    spin_until(lambda: lazy.counters.idle >= 3, publish, timeout=20)
    assert lazy.counters.frames_out == 0


@pytest.fixture(scope="module")
def compressed_graph(tmp_path_factory):
    """(node, probe) in namespace /compressed: PNG input, every 2nd row/column in a coloured cloud."""
    model = ramp_model(tmp_path_factory.mktemp("ramp") / "ramp.onnx", size=(HEIGHT, WIDTH))
    context = rclpy.Context()
    rclpy.init(context=context)
    values = {"image_transport": "compressed", "points_stride": 2, "colorize_points": True}
    node = DepthNode(context=context, namespace="compressed", parameter_overrides=node_parameters(model, **values))
    probe = Probe(context, extra_nodes=[node], namespace="compressed")
    yield node, probe
    probe.close()
    node.destroy_node()
    context.try_shutdown()


def test_compressed_input_and_a_strided_coloured_cloud(compressed_graph):
    from sensor_msgs.msg import CompressedImage

    node, probe = compressed_graph
    publisher = probe.node.create_publisher(CompressedImage, "image/compressed", 10)
    rgb, info = ramp_image(HEIGHT, WIDTH), camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0)
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    stamp = Stamps.new()

    def publish() -> None:
        info.header = make_header(stamp, "camera_optical")
        probe.pub_info.publish(info)
        publisher.publish(CompressedImage(header=make_header(stamp, "camera_optical"), format="png", data=png))

    spin_until(lambda: all(probe.get(t, stamp) for t in ("depth", "depth/camera_info", "points")), publish)
    depth_msg, info_out, points = (probe.get(t, stamp) for t in ("depth", "depth/camera_info", "points"))
    np.testing.assert_allclose(depth_array(depth_msg), rgb[..., 0] / 255.0 + 1.0, atol=1e-4)  # PNG is lossless
    assert (points.height, points.width) == (HEIGHT // 2, WIDTH // 2)
    assert [f.name for f in points.fields] == ["x", "y", "z", "rgb"]
    assert assert_cloud_is_backprojection(depth_msg, info_out, points, stride=2) == (HEIGHT // 2) * (WIDTH // 2)
    raw = np.frombuffer(bytes(points.data), np.uint8).reshape(HEIGHT // 2, WIDTH // 2, points.point_step)
    rgb_offset = next(f.offset for f in points.fields if f.name == "rgb")
    packed = raw[..., rgb_offset : rgb_offset + 4].copy().view("<u4")[..., 0]  # PCL: 0x00RRGGBB
    np.testing.assert_array_equal(np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], -1), rgb[::2, ::2])


@pytest.mark.parametrize(
    ("bomb", "declared"),
    [(png_bomb(12000, 12000), "12000x12000 (144.0 MP)"), (jpeg_bomb(8000, 8000), "8000x8000 (64.0 MP)")],
    ids=["png", "jpeg"],
)
def test_a_decompression_bomb_is_refused_unread_and_the_next_frame_is_processed(compressed_graph, bomb, declared):
    from sensor_msgs.msg import CompressedImage

    node, probe = compressed_graph
    publisher = probe.node.create_publisher(CompressedImage, "image/compressed", 10)
    rgb, info = ramp_image(HEIGHT, WIDTH), camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0)
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()

    def publish(stamp: int, data: bytes) -> None:
        info.header = make_header(stamp, "camera_optical")
        probe.pub_info.publish(info)
        publisher.publish(CompressedImage(header=make_header(stamp, "camera_optical"), format="png", data=data))

    warning = f"frame skipped: CompressedImage declares {declared}, more than max_image_pixels=40000000"
    bad_stamp, counters = Stamps.new(), dict(vars(node.counters))
    spin_until(lambda: probe.warnings(warning) and node.counters.bad_input > counters["bad_input"],
               lambda: publish(bad_stamp, bomb))  # fmt: skip
    assert node.counters.failed == counters["failed"] and node.counters.frames_out == counters["frames_out"]
    assert probe.get("depth", bad_stamp) is None and probe.get("depth/camera_info", bad_stamp) is None
    stamp = Stamps.new()
    spin_until(lambda: probe.get("depth", stamp), lambda: publish(stamp, png))
    np.testing.assert_allclose(depth_array(probe.get("depth", stamp)), rgb[..., 0] / 255.0 + 1.0, atol=1e-4)


def _with(msg, **fields):
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


# --- the console script, as users run it --------------------------------------------------------------------------
def run_console(*ros_args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_console("depth_node"), "--ros-args", *ros_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def _console(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_an_int8_model_runs_end_to_end(tmp_path_factory):
    """A static INT8 (QDQ) export in a DepthNode on a real graph: depth, confidence and cloud as with FP32."""
    fp32, int8 = exported_int8_student(tmp_path_factory)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = DepthNode(context=context, namespace="int8", parameter_overrides=node_parameters(int8))
    probe = Probe(context, extra_nodes=[node], namespace="int8")
    try:
        rgb = ramp_image(HEIGHT, WIDTH)
        topics = ("depth", "depth/camera_info", "points", "depth/confidence")
        stamp = publish_until_output(probe, rgb, camera_info_msg(K_FULL, 2 * WIDTH, 2 * HEIGHT, 0), topics=topics)
        depth_msg, info, points = (probe.get(t, stamp) for t in ("depth", "depth/camera_info", "points"))
        depth = depth_array(depth_msg)
        assert depth.shape == (HEIGHT, WIDTH) and np.isfinite(depth).all()
        assert assert_cloud_is_backprojection(depth_msg, info, points) == HEIGHT * WIDTH
        want = open_engine(fp32, backend="onnxruntime-cpu").infer(rgb).depth  # the FP32 model on the same frame
        assert np.median(np.abs(depth - want) / want) < 0.05
        assert 0 <= depth_array(probe.get("depth/confidence", stamp)).min()
    finally:
        probe.close()
        node.destroy_node()
        context.try_shutdown()


@pytest.mark.slow
def test_console_script_with_the_kitti_params_file_on_the_real_kitti_frame(tmp_path_factory, shared_data):
    model = exported_student(tmp_path_factory)
    rgb, info = kitti_frame(shared_data)
    camera = "/kitti/camera_color_left"
    process = subprocess.Popen(
        [
            _console("depth_node"),
            "--ros-args",
            "--params-file",
            str(REPO / "config/kitti.yaml"),
            "-p",
            f"model:={model}",
            "-r",
            f"image:={camera}/image_raw",
            "-r",
            f"camera_info:={camera}/camera_info",
            "-r",
            "depth:=/depth",
            "-r",
            "points:=/points",
            "-r",
            "depth/camera_info:=/depth/camera_info",
            "-r",
            "depth/confidence:=/depth/confidence",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    context = rclpy.Context()
    rclpy.init(context=context)
    probe = Probe(
        context,
        names={
            "image": f"{camera}/image_raw",
            "camera_info": f"{camera}/camera_info",
            **{t: "/" + t for t in ("depth", "depth/camera_info", "points", "depth/confidence")},
        },
    )
    try:
        stamp = 1317042146477058304
        topics = ("depth", "depth/camera_info", "points", "depth/confidence")
        spin_until(
            lambda: all(probe.get(t, stamp) for t in topics) or process.poll() is not None,
            lambda: probe.publish_frame(rgb, info, stamp, frame_id="camera_color_left"),
            timeout=90,
        )
        assert process.poll() is None, process.stdout.read()
        depth_msg, info_out, points = (probe.get(t, stamp) for t in ("depth", "depth/camera_info", "points"))
        assert (depth_msg.encoding, depth_msg.height, depth_msg.width) == ("32FC1", 375, 1242)
        assert depth_msg.header.frame_id == "camera_color_left" and (info_out.width, info_out.height) == (1242, 375)
        np.testing.assert_allclose(info_out.k, info.k)
        assert assert_cloud_is_backprojection(depth_msg, info_out, points) > 0
        depth = depth_array(depth_msg)
        assert np.isnan(depth).sum() == 0 and (depth[np.isfinite(depth)] > 0).all()
        confidence = depth_array(probe.get("depth/confidence", stamp))
        assert confidence.shape == (375, 1242) and 0 <= confidence.min() and confidence.max() <= 1
    finally:
        probe.close()
        context.try_shutdown()
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "loaded" in output and process.returncode in (0, -15), output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ros_args", "message"),
    [
        (["-p", "model:=/nonexistent/model.onnx"], "model file not found: /nonexistent/model.onnx"),
        (["-p", "model:=MODEL", "-p", "max_dept:=10.0"], "unknown depth_node parameter 'max_dept' (did you mean"),
        (["-p", "model:=MODEL", "-p", "points_stride:=0"], "parameter 'points_stride' must be >= 1"),
        (["-p", "model:=MODEL", "-p", "backend:=cuda"], "parameter 'backend' must be one of"),
    ],
)
def test_console_script_start_up_errors_name_the_problem(tmp_path, ros_args, message):
    model = ramp_model(tmp_path / "ramp.onnx")
    result = run_console(*[arg.replace("MODEL", str(model)) for arg in ros_args])
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ros_args", "problem"),
    [
        (["-p", "model:="], "Couldn't parse parameter override rule: '-p model:='"),
        (["-p"], "Couldn't parse trailing -p flag. No parameter override rule found."),
        (
            ["--params-file", "MISSING"],
            "Couldn't parse params file: '--params-file MISSING'. Error: Error opening YAML file",
        ),
        (
            ["--params-file", "BROKEN"],
            "Couldn't parse params file: '--params-file BROKEN'. Error: Error parsing a event near line 3",
        ),
        (["--params-file"], "Couldn't parse trailing --params-file flag. No file path provided."),
        (["-r", "image"], "Couldn't parse remap rule: '-r image'"),
    ],
    ids=["empty value", "trailing -p", "missing params file", "broken params file", "no params file", "bad remap"],
)
def test_malformed_ros_args_are_one_line_and_exit_code_1(tmp_path, ros_args, problem):
    broken = tmp_path / "broken.yaml"
    broken.write_text("depth_node:\n  ros__parameters:\n    model: [unclosed\n")
    names = {"MISSING": str(tmp_path / "missing.yaml"), "BROKEN": str(broken)}
    result = run_console(*[names.get(arg, arg) for arg in ros_args])
    for name, path in names.items():
        problem = problem.replace(name, path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"depth_node: error: invalid --ros-args: {problem}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line: no traceback, no rcl log line
