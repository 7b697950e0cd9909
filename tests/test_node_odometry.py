"""The live node's temporal filter fed by nav_msgs/Odometry (`odometry: odom`) on a real rclpy graph: a wall the
camera drives towards is smoothed along the known motion, with the camera mount from `camera_to_base`; bad values of
the odometry parameters are one-line start-up errors.

The model is closed-form (depth = 20 * red01 + 5 m, tests/node_fixtures.py), so a uniform image is a fronto-parallel
wall at a known distance and the filtered depth can be predicted exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import rclpy
from node_fixtures import Probe, camera_info_msg, depth_array, make_header, ramp_model, spin_until
from rclpy.parameter import Parameter

from depth_node.node import DepthNode

pytestmark = pytest.mark.ros

HEIGHT, WIDTH = 48, 64
K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])
SCALE, OFFSET = 20.0, 5.0  # the ramp model's depth = SCALE * red01 + OFFSET metres
WEIGHT = 0.5
STEP_M = 0.5  # base_link drives this far along its x axis between the two frames
STAMPS = (3_000_000_000, 3_100_000_000)


def wall(red: int) -> np.ndarray:
    """A uniform image: the ramp model sees a wall at SCALE * red / 255 + OFFSET metres."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[..., 0] = red
    return image


def odometry_msg(stamp_ns: int, x: float):
    """base_link `x` metres along odom's x axis, unrotated."""
    from nav_msgs.msg import Odometry

    msg = Odometry(header=make_header(stamp_ns, "odom"), child_frame_id="base_link")
    msg.pose.pose.position.x = x
    msg.pose.pose.orientation.w = 1.0
    return msg


def node_parameters(model, **values) -> list[Parameter]:
    values = {"model": str(model), "sub_reliability": "reliable", "temporal_filter": WEIGHT} | values
    return [Parameter(name, value=value) for name, value in values.items()]


@pytest.fixture()
def context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


def test_odometry_topic_smooths_a_wall_along_the_known_motion(tmp_path, context):
    model = ramp_model(tmp_path / "ramp.onnx", size=(HEIGHT, WIDTH), scale=SCALE, offset=OFFSET, depth_range=(1, 40))
    node = DepthNode(context=context, parameter_overrides=node_parameters(model, odometry="odom"))
    probe = Probe(context, extra_nodes=[node])
    try:
        from nav_msgs.msg import Odometry

        pub_odom = probe.node.create_publisher(Odometry, "odom", 10)
        odometry = [odometry_msg(stamp, STEP_M * i) for i, stamp in enumerate(STAMPS)]
        # No tf2_msgs here: the camera mount is camera_to_base's default, the optical frame looking along base x,
        # so driving STEP_M along base x brings the camera STEP_M nearer to the wall.
        spin_until(
            lambda: node.stream.odometry.camera_pose("camera_optical", STAMPS[1]) is not None,
            lambda: [pub_odom.publish(msg) for msg in odometry],
        )
        info = camera_info_msg(K, WIDTH, HEIGHT, 0)
        first_red, second_red = 128, 120
        spin_until(lambda: probe.get("depth", STAMPS[0]), lambda: probe.publish_frame(wall(first_red), info, STAMPS[0]))
        probe.publish_frame(wall(second_red), info, STAMPS[1])  # once: a repeat would be filtered against itself
        spin_until(lambda: probe.get("depth", STAMPS[1]))
        first, second = (depth_array(probe.get("depth", stamp)) for stamp in STAMPS)
    finally:
        probe.close()
        node.destroy_node()
    raw_first, raw_second = (SCALE * red / 255 + OFFSET for red in (first_red, second_red))
    np.testing.assert_allclose(first, raw_first, rtol=1e-4)  # the first frame has nothing to blend with
    carried = raw_first - STEP_M  # the first wall, moved by the odometry into the second view
    expected = np.exp((1 - WEIGHT) * np.log(raw_second) + WEIGHT * np.log(carried))
    np.testing.assert_allclose(second, expected, rtol=1e-4)
    assert raw_second < second.min() and second.max() < carried  # between the new frame and the moved previous one
    unmoved = np.exp((1 - WEIGHT) * np.log(raw_second) + WEIGHT * np.log(raw_first))
    assert abs(float(second.mean()) - unmoved) > 0.1  # the motion was used, not just the previous frame


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"odometry": "gps"}, "parameter 'odometry' must be one of tf, odom, got 'gps'"),
        ({"odometry": 3}, "parameter 'odometry' must be one of tf, odom, got 3"),
        ({"odometry": "odom", "camera_to_base": [1.0, 0.0]}, "parameter 'camera_to_base' must have 16 values"),
        (
            {"odometry": "odom", "camera_to_base": [2.0 * (i % 5 == 0) for i in range(15)] + [1.0]},
            "parameter 'camera_to_base' must be a rigid transform",
        ),
    ],
    ids=["unknown source", "not a string", "too few numbers", "scaled"],
)
def test_bad_odometry_parameters_are_one_line_start_up_errors(tmp_path, context, values, message):
    model = ramp_model(tmp_path / "ramp.onnx", size=(HEIGHT, WIDTH))
    with pytest.raises(ValueError) as error:
        DepthNode(context=context, parameter_overrides=node_parameters(model, **values))
    assert message in str(error.value) and "\n" not in str(error.value)
