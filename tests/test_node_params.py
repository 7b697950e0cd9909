"""Run-time parameters of the depth node, set through a real rclpy parameter client (what `ros2 param set` does):
values that can change are checked as at start-up and applied from the next frame, bad ones are refused with the
reason and change nothing, and the rest are read-only. What `get` reports is always what the node uses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rclpy
from node_fixtures import (
    Probe,
    camera_info_msg,
    depth_array,
    ramp_image,
    ramp_model,
    spin_until,
)
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.parameter_client import AsyncParameterClient

from depth_node import params
from depth_node.node import DepthNode

pytestmark = pytest.mark.ros

HEIGHT, WIDTH = 48, 64
K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """(node, probe, client): a DepthNode in namespace "tuned", a probe there and a parameter client of the node."""
    model = ramp_model(tmp_path_factory.mktemp("tuned") / "ramp.onnx", size=(HEIGHT, WIDTH))
    context = rclpy.Context()
    rclpy.init(context=context)
    values = {"model": str(model), "sub_reliability": "reliable", "diagnostics_period": 0.5}
    node = DepthNode(
        context=context, namespace="tuned", parameter_overrides=[Parameter(k, value=v) for k, v in values.items()]
    )
    probe = Probe(context, extra_nodes=[node], namespace="tuned")
    client = AsyncParameterClient(probe.node, "/tuned/depth_node")
    assert client.wait_for_services(timeout_sec=30)
    yield node, probe, client
    probe.close()
    node.destroy_node()
    context.try_shutdown()


def wait(future):
    spin_until(future.done, timeout=10)
    return future.result()


def set_parameter(client, name: str, value):
    """(successful, reason) of one `ros2 param set`."""
    (result,) = wait(client.set_parameters([Parameter(name, value=value)])).results
    return result.successful, result.reason


def get_parameter(client, name: str):
    """What `ros2 param get` reports."""
    (value,) = wait(client.get_parameters([name])).values
    reported = parameter_value_to_python(value)
    return list(reported) if name == "lidar_to_camera" else reported


STAMPS = iter(range(7_000_000_000, 8_000_000_000, 100_000_000))


def frame_outputs(probe: Probe, rgb: np.ndarray) -> tuple:
    """(depth (H, W), points message) of a new frame."""
    stamp, info = next(STAMPS), camera_info_msg(K, WIDTH, HEIGHT, 0)
    spin_until(
        lambda: probe.get("depth", stamp) and probe.get("points", stamp), lambda: probe.publish_frame(rgb, info, stamp)
    )
    return depth_array(probe.get("depth", stamp)), probe.get("points", stamp)


def test_run_time_parameters_are_applied_from_the_next_frame(graph):
    node, probe, client = graph
    rgb = ramp_image(HEIGHT, WIDTH)
    depth, points = frame_outputs(probe, rgb)
    expected = rgb[..., 0] / 255.0 + 1.0  # in the model's range [0.5, 3] m: all finite
    np.testing.assert_allclose(depth, expected, atol=1e-4)
    assert (points.height, points.width, [f.name for f in points.fields]) == (HEIGHT, WIDTH, ["x", "y", "z"])
    for name, value in (("max_depth", 1.5), ("points_stride", 2), ("colorize_points", True)):
        assert set_parameter(client, name, value) == (True, "")
        assert get_parameter(client, name) == value
    depth, points = frame_outputs(probe, rgb)
    assert np.isposinf(depth[expected > 1.5 + 1e-3]).all()  # beyond the new max_depth: +Inf (REP 117)
    np.testing.assert_allclose(depth[expected < 1.5 - 1e-3], expected[expected < 1.5 - 1e-3], atol=1e-4)
    assert (points.height, points.width) == (HEIGHT // 2, WIDTH // 2) and points.fields[-1].name == "rgb"
    assert node.params["max_depth"] == 1.5 and node.pipeline.max_depth == 1.5
    spin_until(lambda: any("parameters set: max_depth=1.5" in m for _, _, m in list(probe.logs)))
    for name, value in (("max_depth", 0.0), ("points_stride", 1), ("colorize_points", False)):  # back to the start
        assert set_parameter(client, name, value) == (True, "")


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("points_stride", 0, "parameter 'points_stride' must be >= 1, got 0"),
        ("min_depth", 5.0, "parameter 'min_depth' (5.0) must be < 'max_depth' (2.0)"),
        ("max_depth", "far", "parameter 'max_depth' must be a finite number, got 'far'"),
        ("alignment_momentum", 1.0, "parameter 'alignment_momentum' must be in [0, 1), got 1.0"),
        ("diagnostics_period", 1e-6, "parameter 'diagnostics_period' must be in [0.1, 3600.0] s, got 1e-06"),
        ("lidar_to_camera", [0.0] * 12 + [0.0, 0.0, 0.0, 1.0], "parameter 'lidar_to_camera' must be a rigid transform"),
    ],
)
def test_bad_run_time_values_are_refused_with_the_reason_and_change_nothing(graph, name, value, reason):
    node, probe, client = graph
    if name == "min_depth":
        assert set_parameter(client, "max_depth", 2.0) == (True, "")
    before, reported = dict(node.params), get_parameter(client, name)
    successful, why = set_parameter(client, name, value)
    assert not successful and why.startswith(reason), why
    assert get_parameter(client, name) == reported and node.params == before
    if name == "min_depth":
        assert set_parameter(client, "max_depth", 0.0) == (True, "")
    np.testing.assert_allclose(frame_outputs(probe, ramp_image(HEIGHT, WIDTH))[0].shape, (HEIGHT, WIDTH))


@pytest.mark.parametrize("name", [n for n, spec in params.PARAMETERS.items() if not spec.runtime])
def test_start_up_parameters_are_read_only(graph, name):
    node, _, client = graph
    reported = get_parameter(client, name)
    successful, reason = set_parameter(client, name, params.PARAMETERS[name].default)
    assert not successful and "read-only" in reason, reason
    assert get_parameter(client, name) == reported and node.params[name] == reported


def test_the_read_only_set_is_what_the_node_cannot_change_while_running():
    read_only = {name for name, spec in params.PARAMETERS.items() if not spec.runtime}
    assert read_only == {"model", "backend", "device", "threads", "resize", "image_transport", "use_lidar",
                         "use_tf", "temporal_filter", "temporal_tolerance", "odometry", "odom_frame",
                         "camera_to_base", "completion_model", "sub_reliability", "sub_depth", "pub_reliability",
                         "pub_depth"}  # fmt: skip
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sentence = readme.split("### Parameters")[1].split("| name |")[0]
    assert set(re.findall(r"`(\w+)`", sentence)) - {"ros2"} == set(params.PARAMETERS) - read_only


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_parameter_and_starts_nothing(flag):
    """`depth_node --help` is usage text on stdout and exit 0, not a missing-model error (nor a DDS start)."""
    script = Path(sys.executable).parent / "depth_node"
    result = subprocess.run([str(script), flag], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("usage: depth_node --ros-args -p model:=MODEL.onnx")
    listed = {line.split()[1] if line.startswith("  *") else line.split()[0] for line in result.stdout.splitlines()
              if line.startswith("  ")}  # fmt: skip
    assert listed == set(params.PARAMETERS)
    runtime = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("  *")}
    assert runtime == {name for name, spec in params.PARAMETERS.items() if spec.runtime}
