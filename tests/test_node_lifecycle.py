"""The depth node's lifecycle: a camera that changes resolution mid-stream, a camera driver that restarts, a bag
that loops (stamps jump back), subscribers that come and go (lazy processing), a model file that cannot be used
(clear one-line error, exit code 1), and SIGINT / SIGTERM while frames are being processed (exit code 0 while the
frames keep arriving: rclpy handles both signals and `main` returns normally, so neither leaves as 128 + signal).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import rclpy
from node_fixtures import (
    Probe,
    camera_info_msg,
    cloud_msg,
    depth_array,
    image_msg,
    ramp_image,
    ramp_model,
    spin_until,
    surface_scan,
)
from rclpy._rclpy_pybind11 import InvalidHandle
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image

from depth_node.metadata import ModelLoadError, read_onnx_metadata
from depth_node.node import DepthNode
from depth_node.trt_backend import SIDECAR_FORMAT

pytestmark = pytest.mark.ros

MODEL_SIZE = (48, 64)
STAMPS = itertools.count(5_000_000_000, 50_000_000)
# KITTI's left colour camera, and the same camera binned 2x2 with a slightly different calibration.
K_FULL = np.array([[721.5377, 0.0, 609.5593], [0.0, 721.5377, 172.854], [0.0, 0.0, 1.0]])
K_HALF = np.array([[360.0, 0.0, 305.0], [0.0, 360.5, 86.0], [0.0, 0.0, 1.0]])


def parameters(model: Path, **values) -> list[Parameter]:
    return [Parameter(name, value=value) for name, value in ({"model": str(model)} | values).items()]


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """(context, node, probe, model): a DepthNode with default parameters in namespace "life" and a probe there."""
    model = ramp_model(tmp_path_factory.mktemp("life") / "ramp.onnx", size=MODEL_SIZE)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = DepthNode(context=context, namespace="life", parameter_overrides=parameters(model))
    probe = Probe(context, extra_nodes=[node], namespace="life")
    yield context, node, probe, model
    probe.close()
    node.destroy_node()
    context.try_shutdown()


def stream_until(condition, camera_node, rgb: np.ndarray, K: np.ndarray, publishers=None) -> int:
    """Publish camera_info + image (new stamps) from `camera_node` until condition(stamp) holds; that stamp."""
    info_pub, image_pub = publishers or camera_publishers(camera_node)
    height, width = rgb.shape[:2]
    stamps = []

    def publish() -> None:
        stamps.append(next(STAMPS))
        info_pub.publish(camera_info_msg(K, width, height, stamps[-1]))
        image_pub.publish(image_msg(rgb, stamps[-1]))

    spin_until(lambda: any(condition(stamp) for stamp in stamps), publish)
    return next(stamp for stamp in stamps if condition(stamp))


def camera_publishers(camera_node: Node):
    """camera_info and image publishers with sensor-data QoS, as camera drivers have them."""
    return (
        camera_node.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data),
        camera_node.create_publisher(Image, "image", qos_profile_sensor_data),
    )


def test_a_resolution_change_mid_stream_is_followed_by_the_outputs(graph):
    probe = graph[2]

    def follows(stamp: int, K: np.ndarray) -> bool:
        """Depth and camera_info out for this stamp, with the intrinsics K (not the previous ones rescaled)."""
        info = probe.get("depth/camera_info", stamp)
        return bool(probe.get("depth", stamp) and info and np.allclose(info.k, K.ravel()))

    for (height, width), K in (((375, 1242), K_FULL), ((188, 621), K_HALF)):
        rgb = ramp_image(height, width)
        stamp = stream_until(lambda s, K=K: follows(s, K), probe.node, rgb, K)
        depth, info = depth_array(probe.get("depth", stamp)), probe.get("depth/camera_info", stamp)
        assert depth.shape == (height, width) and (info.width, info.height) == (width, height)
        np.testing.assert_allclose(np.reshape(info.p, (3, 4))[:, :3], K)
        # the ramp model's depth (red/255 + 1 m) survives the resize to the 48x64 input and back
        inner = np.s_[:, width // 8 : -width // 8]
        np.testing.assert_allclose(depth[inner], rgb[..., 0][inner] / 255.0 + 1.0, atol=0.02)
        points = probe.get("points", stamp)
        assert points is None or (points.height, points.width) == (height, width)
    spin_until(lambda: any("image size changed from 1242x375 to 621x188" in m for _, _, m in list(probe.logs)))


def test_the_node_keeps_processing_when_the_camera_driver_restarts(graph):
    _, node, probe, _ = graph
    rgb = ramp_image(*MODEL_SIZE)
    for _ in range(2):  # the driver, then the driver started again: each its own DDS participant, as a process is
        context = rclpy.Context()
        rclpy.init(context=context)
        camera = Node("camera_driver", namespace="life", context=context)
        stamp = stream_until(lambda s: probe.get("depth", s), camera, rgb, K_HALF)
        np.testing.assert_allclose(depth_array(probe.get("depth", stamp)), rgb[..., 0] / 255.0 + 1.0, atol=1e-4)
        camera.destroy_node()
        context.try_shutdown()  # its participant leaves the graph, as when the driver process exits
    assert node.counters.failed == 0


def test_a_lazy_node_starts_when_someone_subscribes_and_stops_when_they_leave(graph):
    context, _, probe, model = graph
    lazy = DepthNode(context=context, namespace="life_lazy", parameter_overrides=parameters(model))
    camera = Node("camera_driver", namespace="life_lazy", context=context)
    publishers = camera_publishers(camera)
    probe.executor.add_node(lazy)
    rgb = ramp_image(*MODEL_SIZE)
    try:
        stream_until(lambda _: lazy.counters.idle >= 2, camera, rgb, K_HALF, publishers)
        assert lazy.counters.frames_out == 0
        listener = Node("viewer", namespace="life_lazy", context=context)
        received = []
        listener.create_subscription(Image, "depth", received.append, 10)
        probe.executor.add_node(listener)
        stream_until(lambda _: received, camera, rgb, K_HALF, publishers)
        probe.executor.remove_node(listener)
        listener.destroy_node()
        idle = lazy.counters.idle
        stream_until(lambda _: lazy.counters.idle >= idle + 2, camera, rgb, K_HALF, publishers)
        frames_out = lazy.counters.frames_out
        stream_until(lambda _: lazy.counters.idle >= idle + 4, camera, rgb, K_HALF, publishers)
        assert lazy.counters.frames_out == frames_out  # no inference once the last subscriber left
    finally:
        probe.executor.remove_node(lazy)
        for each in (camera, lazy):
            each.destroy_node()


def test_stamps_jumping_back_reset_the_lidar_scale_prior(graph):
    """A bag played in a loop: the scale fitted at its end must not carry over to its start."""
    context, _, _, model = graph
    K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])
    values = {"use_lidar": True, "lazy": False, "lidar_max_dt": 0.02}
    node = DepthNode(context=context, namespace="life_loop", parameter_overrides=parameters(model, **values))
    rgb = ramp_image(*MODEL_SIZE)
    truth = 2.5 * (rgb[..., 0] / 255.0 + 1.0) + 0.3
    try:
        node.stream.on_camera_info(camera_info_msg(K, MODEL_SIZE[1], MODEL_SIZE[0], 0))
        end_of_bag = 100_000_000_000
        node.stream.on_scan(cloud_msg(surface_scan(truth, K, np.eye(4)), end_of_bag, "velodyne"))
        assert node.handle_frame(image_msg(rgb, end_of_bag)).alignment.ok
        still = node.handle_frame(image_msg(rgb, end_of_bag + 100_000_000))  # no scan: the prior holds the scale
        assert still.alignment.from_prior and still.metric
        np.testing.assert_allclose(still.depth, truth, rtol=0.01)
        restart = node.handle_frame(image_msg(rgb, 1_000_000_000))  # the bag starts over, no scan yet
        assert not restart.alignment.ok and node.pipeline.prior.scale is None
        np.testing.assert_allclose(restart.depth, rgb[..., 0] / 255.0 + 1.0, atol=1e-4)  # the model's own scale
    finally:
        node.destroy_node()


def test_a_failed_start_destroys_the_half_built_node_before_raising(graph, tmp_path):
    """The node is gone from the graph the moment the error is raised, even while the error keeps the object alive."""
    context, _, probe, _ = graph
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an ONNX model")
    with pytest.raises(ModelLoadError, match="not a readable ONNX model") as error:
        DepthNode(context=context, namespace="failed_start", parameter_overrides=parameters(broken))
    frames = traceback.walk_tb(error.value.__traceback__)
    half_built = next(f.f_locals["self"] for f, _ in frames if isinstance(f.f_locals.get("self"), DepthNode))
    with pytest.raises(InvalidHandle):
        half_built.get_name()
    assert list(half_built.publishers) == [] and list(half_built.services) == []
    assert ("depth_node", "/failed_start") not in probe.node.get_node_names_and_namespaces()


# --- the console script ------------------------------------------------------------------------------------------
def console() -> str:
    return str(Path(sys.executable).parent / "depth_node")


def stale_engine(folder: Path) -> Path:
    """A TensorRT engine file whose sidecar says it was built by TensorRT 8.6.1 on another GPU."""
    source = ramp_model(folder / "ramp.onnx")
    key = "trt8.6.1-nvidia-jetson-orin-fp16-0123456789ab"
    engine = folder / f"ramp.{key}.engine"
    engine.write_bytes(bytes(range(256)) * 16)
    sidecar = {"format": SIDECAR_FORMAT, "key": key, "tensorrt": "8.6.1",
               "gpu": "NVIDIA Jetson Orin", "precision": "fp16", "onnx": source.name,
               "metadata": json.loads(read_onnx_metadata(source).to_json())}  # fmt: skip
    engine.with_name(engine.name + ".json").write_text(json.dumps(sidecar))
    return engine


def model_problem(kind: str, folder: Path) -> tuple[Path, list[str], list[str]]:
    """(model file, extra ros args, what the error must say) for one unusable model."""
    if kind == "random bytes":
        path = folder / "model.onnx"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return path, [], ["not a readable ONNX model"]
    if kind == "text file":
        path = folder / "model.onnx"
        path.write_text("model: efficientnet_b0\nweights: see the wiki\n")
        return path, [], ["not a readable ONNX model"]
    # backend auto would fall back on ONNX Runtime with the source model: ask for TensorRT explicitly
    here = importlib.util.find_spec("tensorrt") is not None
    reason = "engine built for TensorRT 8.6.1 on 'NVIDIA Jetson Orin'" if here else "TensorRT Python package not"
    return stale_engine(folder), ["-p", "backend:=tensorrt"], ["no tensorrt backend could run it", reason]


@pytest.mark.slow
def test_unusable_model_files_fail_at_start_up_with_one_line_naming_file_and_problem(tmp_path):
    kinds = ("random bytes", "text file", "engine for another TensorRT")
    runs = {}
    for kind in kinds:  # started together: each spends its second or so importing rclpy and ONNX Runtime
        folder = tmp_path / kind.replace(" ", "_")
        folder.mkdir()
        path, extra, problem = model_problem(kind, folder)
        command = [console(), "--ros-args", "-p", f"model:={path}", *extra]
        runs[kind] = (
            path,
            problem,
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
    for kind, (path, problem, process) in runs.items():
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 1, (kind, stderr)
        assert stderr.strip().splitlines() == [stderr.strip()], (kind, stderr)  # one line
        assert stderr.startswith(f"depth_node: error: {path}: ") and all(p in stderr for p in problem), (kind, stderr)
        assert "Traceback" not in stderr + stdout


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_frames_are_processed_shuts_down_cleanly_while_they_keep_arriving(tmp_path, signum):
    model = ramp_model(tmp_path / "ramp.onnx", size=(96, 320))  # KITTI-size frames: a few ms of work each
    process = subprocess.Popen(
        [
            console(),
            "--ros-args",
            "-p",
            f"model:={model}",
            "-p",
            "sub_reliability:=reliable",
            "-p",
            "publish_points:=false",
            "-r",
            "__ns:=/sig",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    context = rclpy.Context()
    rclpy.init(context=context)
    probe = Probe(context, namespace="sig")
    rgb, info = ramp_image(375, 1242), camera_info_msg(K_FULL, 1242, 375, 0)
    streaming = threading.Event()

    def stream() -> None:
        while not streaming.wait(0.05):
            probe.publish_frame(rgb, info, next(STAMPS))

    publisher = threading.Thread(target=stream, daemon=True)
    try:
        publisher.start()
        spin_until(lambda: len(probe.received["depth"]) >= 3 or process.poll() is not None, timeout=60)
        assert process.poll() is None, process.communicate()[1]
        sent_at = time.time()
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)  # a guard against a hang, not a speed target
        # The input never stopped: the node left on the signal itself, not once the frames ran out.
        exited_while_streaming = publisher.is_alive() and not streaming.is_set()
    finally:
        streaming.set()
        publisher.join()
        probe.close()
        context.try_shutdown()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert exited_while_streaming, f"{signal.Signals(signum).name}: the node waited for the input to end"
    assert "Traceback" not in stdout + stderr and "Failed to publish" not in stderr, stderr
    assert not logged_after(stderr, sent_at, ("[WARN]", "[ERROR]", "[FATAL]")), stderr  # nothing went wrong in exit


def logged_after(log: str, since: float, levels: tuple[str, ...]) -> list[str]:
    """Lines of an rclpy console log ("[WARN] [<unix time>] [node]: text") at these levels from `since` on."""
    lines = [line.split(" ", 2) for line in log.splitlines() if line.startswith(levels)]
    return [" ".join(parts) for parts in lines if len(parts) == 3 and float(parts[1].strip("[]")) >= since]


@pytest.mark.slow
def test_sigterm_at_any_moment_of_start_up_exits_without_a_traceback(tmp_path):
    """Before rclpy.init the default action ends the process (-SIGTERM); from then on, even while the model loads or
    the topics are created on a context the signal has shut down, the exit is clean (0)."""
    model = ramp_model(tmp_path / "ramp.onnx", size=(96, 320))
    command = [console(), "--ros-args", "-p", f"model:={model}", "-r", "__ns:=/startup"]
    delays = (0.2, 0.5, 0.8, 1.1, 1.4, 1.7, 2.0)
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in delays]
    started = time.monotonic()
    for delay, process in zip(delays, processes):
        time.sleep(max(0.0, started + delay - time.monotonic()))
        process.send_signal(signal.SIGTERM)
    for delay, process in zip(delays, processes):
        output = process.communicate(timeout=30)[0]
        assert process.returncode in (0, -signal.SIGTERM), (delay, output)
        assert "Traceback" not in output and "Failed to" not in output, (delay, output)
