"""LiDAR metric alignment in the node (issue 7 item 4), on a real rclpy graph with a synthetic scene.

The scene: a surface whose true depth is known at every pixel; the LiDAR (behind a known, non-trivial extrinsic)
samples it, with 10 % of the returns corrupted. The models are closed-form ONNX graphs that see the same image
but are deliberately wrong: a metric model off by scale and shift, and a relative-disparity model (1 / depth up to
scale and shift). The node must publish the truth on `depth`, the raw output on `depth/mono`, fall back cleanly
on empty, stale or malformed scans, and report the fit in diagnostics.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import rclpy
from node_fixtures import (
    Probe,
    assert_cloud_is_backprojection,
    camera_info_msg,
    cloud_msg,
    depth_array,
    ramp_image,
    ramp_model,
    spin_until,
    surface_scan,
)
from rclpy.parameter import Parameter

from depth_node.alignment import Alignment
from depth_node.node import DepthNode
from depth_node.params import IDENTITY_4X4
from depth_node.pipeline import DepthPipeline, PipelineOptions, aligned_states
from depth_node.stream import StampBuffer

HEIGHT, WIDTH = 48, 64
STAMPS = itertools.count(10_000_000_000, 100_000_000)
K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])
# LiDAR x forward, y left, z up -> camera x right, y down, z forward, plus a KITTI-like lever arm.
T_CAM_LIDAR = np.array([[0, -1, 0, 0.05], [0, 0, -1, -0.08], [1, 0, 0, -0.27], [0, 0, 0, 1]], dtype=np.float64)
METRIC_SCALE, METRIC_SHIFT = 2.5, 0.3  # truth = 2.5 * model + 0.3 m
INVERSE_SCALE, INVERSE_SHIFT = 0.1, 0.05  # 1 / truth = 0.1 * model + 0.05 (1/m)


def model_output(rgb: np.ndarray) -> np.ndarray:
    """What both ramp models output: red/255 + 1."""
    return rgb[..., 0] / 255.0 + 1.0


def metric_truth(rgb: np.ndarray) -> np.ndarray:
    return METRIC_SCALE * model_output(rgb) + METRIC_SHIFT


def inverse_truth(rgb: np.ndarray) -> np.ndarray:
    return 1.0 / (INVERSE_SCALE * model_output(rgb) + INVERSE_SHIFT)


def lidar_scan(truth: np.ndarray, stride: int = 3, outliers: float = 0.1, seed: int = 0) -> np.ndarray:
    return surface_scan(truth, K, T_CAM_LIDAR, stride, outliers, seed)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """{"metric": (node, probe), "relative": (node, probe)}: two LiDAR-aligning nodes in their own namespaces."""
    folder = tmp_path_factory.mktemp("lidar_models")
    models = {
        "metric": ramp_model(folder / "metric.onnx", size=(HEIGHT, WIDTH)),
        "relative": ramp_model(folder / "disparity.onnx", size=(HEIGHT, WIDTH), kind="relative_disparity"),
    }
    context = rclpy.Context()
    rclpy.init(context=context)
    parts = {}
    for name, model in models.items():
        values = {
            "model": str(model),
            "use_lidar": True,
            "lidar_to_camera": T_CAM_LIDAR.ravel().tolist(),
            "lidar_max_dt": 0.02,
            "sub_reliability": "reliable",
            "diagnostics_period": 0.2,
        }
        overrides = [Parameter(key, value=value) for key, value in values.items()]
        node = DepthNode(context=context, namespace=name, parameter_overrides=overrides)
        parts[name] = node, Probe(context, extra_nodes=[node], namespace=name)
    yield parts
    for node, probe in parts.values():
        probe.close()
        node.destroy_node()
    context.try_shutdown()


def publish_scan_then_frame(node: DepthNode, probe: Probe, rgb, stamp_ns: int, scan, scan_dt: float = 0.005):
    """Publish a scan stamped scan_dt after the image, wait until the node holds it, then the frame until output."""
    scan_stamp = stamp_ns + int(scan_dt * 1e9)
    if scan is not None:
        message = scan if not isinstance(scan, np.ndarray) else cloud_msg(scan, scan_stamp, "velodyne")
        message.header.stamp.sec, message.header.stamp.nanosec = divmod(scan_stamp, 1_000_000_000)
        spin_until(
            lambda: node.stream.scans.nearest(scan_stamp, 0.0)[0] is not None, lambda: probe.pub_lidar.publish(message)
        )
    info = camera_info_msg(K, WIDTH, HEIGHT, 0)
    frames_out = node.counters.frames_out
    spin_until(
        lambda: node.counters.frames_out > frames_out and probe.get("depth/camera_info", stamp_ns) is not None,
        lambda: probe.publish_frame(rgb, info, stamp_ns),
    )
    topics = ("depth", "depth/relative", "depth/mono", "points")

    def arrived() -> bool:  # each output topic has its own reader: wait for all that this frame publishes
        got = {topic: probe.get(topic, stamp_ns) for topic in topics}
        if got["depth/mono"] is None or (got["depth"] is None and got["depth/relative"] is None):
            return False
        return got["depth"] is None or got["points"] is not None

    spin_until(arrived, timeout=5)
    return {topic: probe.get(topic, stamp_ns) for topic in topics}


def alignment_diagnostics(probe: Probe) -> dict[str, str]:
    for array in reversed(list(probe.diagnostics)):
        for status in array.status:
            if status.name == "depth_node: lidar alignment":
                return {kv.key: kv.value for kv in status.values} | {"message": status.message}
    return {}


@pytest.mark.ros
def test_a_mis_scaled_metric_model_is_aligned_to_the_lidar(graph):
    node, probe = graph["metric"]
    rgb = ramp_image(HEIGHT, WIDTH)
    out = publish_scan_then_frame(node, probe, rgb, 2_000_000_000, lidar_scan(metric_truth(rgb)))
    depth = depth_array(out["depth"])
    np.testing.assert_allclose(depth, metric_truth(rgb), rtol=0.01)
    np.testing.assert_allclose(depth_array(out["depth/mono"]), model_output(rgb), atol=1e-4)
    assert assert_cloud_is_backprojection(out["depth"], probe.get("depth/camera_info", 2_000_000_000), out["points"])
    spin_until(lambda: alignment_diagnostics(probe).get("ok") == "True", timeout=5)
    values = alignment_diagnostics(probe)
    assert abs(float(values["scale"]) - METRIC_SCALE) < 0.02 and abs(float(values["shift"]) - METRIC_SHIFT) < 0.03
    assert float(values["residual_m"]) < 0.02 and int(values["inliers"]) >= 0.85 * int(values["points"])


@pytest.mark.ros
@pytest.mark.parametrize(
    "scan",
    [
        np.zeros((0, 3), np.float32),  # an empty cloud
        np.array([[-5.0, 0.0, 0.0]], np.float32),  # one point, behind the camera: 0 points in the image
        "no_x_field",  # malformed: a cloud without x
    ],
    ids=["empty", "behind", "malformed"],
)
def test_useless_scans_do_not_crash_and_the_metric_scale_is_held_by_the_prior(graph, scan):
    node, probe = graph["metric"]
    rgb = ramp_image(HEIGHT, WIDTH)
    publish_scan_then_frame(node, probe, rgb, next(STAMPS), lidar_scan(metric_truth(rgb)))  # a good fit first
    if isinstance(scan, str):
        scan = cloud_msg(np.ones((5, 3), np.float32), 0, "velodyne")
        scan.fields = [field for field in scan.fields if field.name != "x"]
    out = publish_scan_then_frame(node, probe, rgb, next(STAMPS), scan)
    assert out["depth"] is not None and out["depth/relative"] is None
    np.testing.assert_allclose(depth_array(out["depth"]), metric_truth(rgb), rtol=0.01)
    assert node.stream.last_result.alignment.from_prior and node.stream.last_result.alignment.ok
    if not isinstance(scan, np.ndarray):
        spin_until(lambda: probe.warnings("LiDAR scan skipped: PointCloud2 has no field 'x'"), timeout=5)


@pytest.mark.ros
def test_relative_model_without_a_fit_publishes_on_depth_relative_then_aligns(graph):
    node, probe = graph["relative"]
    rgb = ramp_image(HEIGHT, WIDTH)
    scan = lidar_scan(inverse_truth(rgb))
    stale = publish_scan_then_frame(node, probe, rgb, 4_000_000_000, scan, scan_dt=0.2)  # beyond lidar_max_dt
    assert stale["depth"] is None and stale["points"] is None
    np.testing.assert_allclose(depth_array(stale["depth/relative"]), model_output(rgb), atol=1e-4)
    spin_until(lambda: probe.warnings("no LiDAR scan within lidar_max_dt=0.02 s"), timeout=5)
    spin_until(lambda: probe.warnings("LiDAR alignment failed (no alignment: 0 valid points"), timeout=5)
    spin_until(lambda: probe.warnings("publishing the unaligned output on depth/relative"), timeout=5)

    out = publish_scan_then_frame(node, probe, rgb, 4_500_000_000, scan)
    assert out["depth/relative"] is None
    np.testing.assert_allclose(depth_array(out["depth"]), inverse_truth(rgb), rtol=0.01)
    np.testing.assert_allclose(depth_array(out["depth/mono"]), model_output(rgb), atol=1e-4)
    assert assert_cloud_is_backprojection(out["depth"], probe.get("depth/camera_info", 4_500_000_000), out["points"])
    assert node.stream.last_result.alignment.space == "inverse"


# --- the same logic without ROS ----------------------------------------------------------------------------------
def test_aligned_states_follow_rep117():
    raw = np.array([[1.0, np.inf, -np.inf, np.nan, 0.0]], np.float32)
    aligned = np.array([[2.0, np.inf, np.nan, np.nan, np.nan]], np.float32)
    depth = aligned_states(raw, aligned, "depth", 0.0, 0.0)
    np.testing.assert_array_equal(depth, [[2.0, np.inf, -np.inf, np.nan, np.nan]])
    # inverse space: a finite disparity whose aligned value is not positive lies beyond any range
    np.testing.assert_array_equal(
        aligned_states(raw, aligned, "inverse", 0.0, 0.0), [[2.0, np.nan, -np.inf, np.nan, np.inf]]
    )
    np.testing.assert_array_equal(aligned_states(raw, aligned, "depth", 2.5, 10.0)[0, 0], -np.inf)


def test_completion_hook_receives_rgb_aligned_depth_and_sparse_lidar(tmp_path):
    from depth_node.engine import open_engine

    engine = open_engine(ramp_model(tmp_path / "m.onnx", size=(HEIGHT, WIDTH)), "onnxruntime-cpu")
    options = PipelineOptions(use_lidar=True, lidar_to_camera=T_CAM_LIDAR)
    calls = []

    def completion(rgb, depth, sparse):
        calls.append((rgb.shape, depth.copy(), sparse.copy()))
        return depth + 1.0

    pipeline = DepthPipeline(engine, options, completion=completion)
    rgb = ramp_image(HEIGHT, WIDTH)
    result = pipeline.process(rgb, np.concatenate([K, np.zeros((3, 1))], axis=1), lidar_scan(metric_truth(rgb)))
    ((shape, aligned, sparse),) = calls
    assert shape == rgb.shape and (sparse > 0).sum() >= 0.8 * len(lidar_scan(metric_truth(rgb)))
    np.testing.assert_allclose(aligned, metric_truth(rgb), rtol=0.01)
    np.testing.assert_allclose(result.depth, aligned + 1.0)
    assert isinstance(result.alignment, Alignment) and result.metric
    assert IDENTITY_4X4 != T_CAM_LIDAR.ravel().tolist()


def test_stamp_buffer_pairs_by_nearest_stamp_within_the_tolerance():
    buffer = StampBuffer(size=3)
    for stamp in (100, 200, 300, 400):  # 100 falls out of the buffer
        buffer.add(stamp * 1_000_000, stamp)
    assert buffer.nearest(260 * 1_000_000, 0.05) == (300, pytest.approx(0.04))
    assert buffer.nearest(110 * 1_000_000, 0.05)[0] is None  # 200 is 90 ms away; 100 was dropped
    assert StampBuffer().nearest(0, 1.0) == (None, float("inf"))
