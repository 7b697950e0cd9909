"""The node's temporal filter: odometry-warped smoothing of metric depth (numpy, ROS-free), its odometry buffer fed
from /tf or nav_msgs/Odometry, the node parameters, and `depth_node_bag` using a synthetic bag's /tf odometry."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from node_fixtures import ramp_model
from rosbags.highlevel import AnyReader

from depth_node import params
from depth_node.bag import main as bag_main
from depth_node.codec import transform_to_matrix
from depth_node.temporal_filter import OdometryBuffer, TemporalFilter
from depth_node.topics import ODOMETRY
from distill.flicker import pair_flicker

HEIGHT, WIDTH = 40, 60
K = np.array([[50.0, 0.0, 29.5], [0.0, 50.0, 19.5], [0.0, 0.0, 1.0]])
P = np.concatenate([K, np.zeros((3, 1))], axis=1)


def camera_at(z: float) -> np.ndarray:
    """T_odom_camera of a camera `z` metres along its optical axis."""
    pose = np.eye(4)
    pose[2, 3] = z
    return pose


def test_noise_on_a_static_wall_flickers_less_and_the_error_does_not_grow():
    rng = np.random.default_rng(0)
    smoother, raw_flicker, filtered_flicker, raw_error, filtered_error = TemporalFilter(0.5, 0.1), [], [], [], []
    previous = None
    for frame in range(12):
        truth = np.full((HEIGHT, WIDTH), 30.0 - frame)  # a wall 30 m ahead, the camera drives 1 m a frame
        noisy = (truth * np.exp(rng.normal(0, 0.03, truth.shape))).astype(np.float32)
        filtered = smoother(noisy, P, camera_at(frame), frame * 100_000_000)
        raw_error.append(np.abs(np.log(noisy / truth)).mean())
        filtered_error.append(np.abs(np.log(filtered / truth)).mean())
        if previous is not None:
            gts, motion = (previous[0], truth), np.linalg.inv(camera_at(frame)) @ camera_at(frame - 1)
            raw_flicker.append(pair_flicker((previous[1], noisy), gts, K, motion)[0])
            filtered_flicker.append(pair_flicker((previous[2], filtered), gts, K, motion)[0])
        previous = (truth, noisy, filtered)
    assert np.mean(filtered_flicker) < 0.7 * np.mean(raw_flicker)
    assert np.mean(filtered_error[3:]) < np.mean(raw_error[3:])


def test_frames_without_pose_gaps_and_moving_objects_pass_unchanged():
    smoother = TemporalFilter(0.5, 0.1)
    first = np.full((HEIGHT, WIDTH), 10.0, np.float32)
    assert smoother(first, P, None, 0) is not None and smoother._previous is None  # no pose: nothing to follow
    np.testing.assert_array_equal(smoother(first, P, camera_at(0.0), 0), first)  # the first frame is the start
    second = np.full((HEIGHT, WIDTH), 9.5, np.float32)  # the camera came 0.5 m closer, depth predicted 5 % short
    second[5:15, 5:15] = 4.0  # a car that drove in: far from the warped wall, never blended
    second[20, :] = np.inf  # sky / beyond max range (REP 117) stays as it is
    out = smoother(second, P, camera_at(0.5), 100_000_000)
    np.testing.assert_array_equal(out[5:15, 5:15], 4.0)
    assert np.isinf(out[20]).all()
    # The wall moved by the odometry is at 10 - 0.5 = 9.5 m, as predicted: unmoved, the blend would give 9.75 m.
    np.testing.assert_allclose(out[30, 20:40], 9.5, rtol=1e-6)
    third = np.full((HEIGHT, WIDTH), 9.0, np.float32)
    assert np.array_equal(smoother(third, P, camera_at(1.0), 10**10), third)  # 10 s later: a restart


def test_the_blend_is_the_weighted_geometric_mean_along_the_motion():
    smoother = TemporalFilter(0.25, 0.5)
    smoother(np.full((HEIGHT, WIDTH), 10.0, np.float32), P, camera_at(0.0), 0)
    out = smoother(np.full((HEIGHT, WIDTH), 9.0, np.float32), P, camera_at(1.0), 100_000_000)
    # warped previous: 10 - 1 = 9 m, so the blend of 9 and 9 is 9 wherever something landed
    np.testing.assert_allclose(out, 9.0, rtol=1e-6)
    smoother.reset()
    smoother(np.full((HEIGHT, WIDTH), 10.0, np.float32), P, camera_at(0.0), 0)
    out = smoother(np.full((HEIGHT, WIDTH), 8.0, np.float32), P, camera_at(0.0), 100_000_000)
    np.testing.assert_allclose(out, np.exp(0.75 * np.log(8.0) + 0.25 * np.log(10.0)), rtol=1e-6)


def test_carrying_the_previous_frame_leaves_no_holes_when_the_view_zooms_in():
    from depth_node.temporal_filter import carry_previous

    carried = carry_previous(
        np.full((HEIGHT, WIDTH), 10.0), np.full((HEIGHT, WIDTH), 8.0), P, np.linalg.inv(camera_at(2.0))
    )
    np.testing.assert_allclose(carried, 8.0)  # every pixel: the wall 2 m closer, seen before at 10 m
    right = np.eye(4)
    right[0, 3] = -1.0  # the camera moved 1 m right: the wall 10 m ahead shifts 5 px left
    beside = carry_previous(np.full((HEIGHT, WIDTH), 10.0), np.full((HEIGHT, WIDTH), 10.0), P, right)
    np.testing.assert_allclose(beside[:, :-5], 10.0)
    assert not beside[:, -5:].any()  # those pixels were outside the previous view


def test_odometry_buffer_composes_tf_with_the_static_mount_at_the_nearest_stamp():
    buffer = OdometryBuffer("odom")
    mount = camera_at(1.5)  # camera 1.5 m along base_link's z, say
    buffer.add("base_link", "camera", 0, mount, static=True)
    assert buffer.camera_pose("camera", 0) is None  # no odometry yet
    for stamp in (0, 100, 200):
        odometry = np.eye(4)
        odometry[0, 3] = stamp / 100
        buffer.add("/odom", "base_link", stamp * 1_000_000, odometry)
    np.testing.assert_allclose(buffer.camera_pose("camera", 110_000_000)[:3, 3], [1.0, 0.0, 1.5])
    assert buffer.camera_pose("camera", 400_000_000) is None  # beyond max_dt of every odometry stamp
    assert buffer.camera_pose("other_camera", 100_000_000) is None  # no static chain to that frame


def test_parameters_are_checked():
    assert params.resolve({"model": "m.onnx"})["temporal_filter"] == 0.0  # off by default
    with pytest.raises(ValueError, match=r"'temporal_filter' must be in \[0, 1\)"):
        params.resolve({"model": "m.onnx", "temporal_filter": 1.0})
    with pytest.raises(ValueError, match="'temporal_tolerance' must be > 0"):
        params.resolve({"model": "m.onnx", "temporal_tolerance": 0.0})


def depths(bag) -> list[np.ndarray]:
    with AnyReader([bag]) as reader:
        connections = [c for c in reader.connections if c.topic == "/depth"]
        messages = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=connections)]
    return [np.frombuffer(m.data, np.float32).reshape(m.height, m.width) for m in messages]


def test_bag_tool_follows_the_bags_tf_odometry(synth_root, tmp_path, capsys):
    bag = sorted((synth_root / "bags").iterdir())[0]
    model = ramp_model(tmp_path / "ramp.onnx", size=(64, 192), depth_range=(0.5, 80.0), scale=20.0, offset=5.0)
    assert bag_main([str(bag), str(tmp_path / "plain"), "--model", str(model)]) == 0
    smoothing = ["-p", "temporal_filter:=0.5", "-p", "temporal_tolerance:=0.2"]
    assert bag_main([str(bag), str(tmp_path / "smooth"), "--model", str(model), *smoothing]) == 0
    assert "no /tf pose" not in capsys.readouterr().out
    plain, smooth = depths(tmp_path / "plain"), depths(tmp_path / "smooth")
    assert len(plain) == len(smooth) >= 2
    np.testing.assert_array_equal(plain[0], smooth[0])
    changed = plain[1] != smooth[1]
    assert 0.05 < changed.mean() < 1.0  # blended where the moved previous frame agrees within 20 %
    assert np.all(np.abs(np.log(smooth[1][changed] / plain[1][changed])) < 0.2)


def test_stream_feeds_tf_messages_as_rclpy_and_rosbags_give_them(tmp_path):
    from depth_node.engine import open_engine
    from depth_node.pipeline import DepthPipeline, PipelineOptions
    from depth_node.stream import FrameStream

    values = params.resolve({"model": "m.onnx", "temporal_filter": 0.5})
    engine = open_engine(ramp_model(tmp_path / "ramp.onnx"), "onnxruntime-cpu")
    stream = FrameStream(DepthPipeline(engine, PipelineOptions.from_params(values)), values, lambda event: None)
    stamp = SimpleNamespace(sec=1, nanosec=5)
    vector, rotation = SimpleNamespace(x=1.0, y=2.0, z=0.0), SimpleNamespace(x=0.0, y=0.0, z=0.0, w=1.0)
    transform = SimpleNamespace(translation=vector, rotation=rotation)
    item = SimpleNamespace(header=SimpleNamespace(stamp=stamp, frame_id="odom"), child_frame_id="base_link",
                           transform=transform)  # fmt: skip
    stream.on_transforms(SimpleNamespace(transforms=[item]), static=False)
    mount = SimpleNamespace(header=SimpleNamespace(stamp=stamp, frame_id="base_link"), child_frame_id="cam",
                            transform=SimpleNamespace(translation=SimpleNamespace(x=0.0, y=0.0, z=1.0),
                                                      rotation=rotation))  # fmt: skip
    stream.on_transforms(SimpleNamespace(transforms=[mount]), static=True)
    expected = transform_to_matrix(transform) @ transform_to_matrix(mount.transform)
    np.testing.assert_allclose(stream.odometry.camera_pose("cam", 10**9 + 5), expected)
    assert stream.temporal is not None and stream.temporal.weight == 0.5


def test_stream_feeds_odometry_messages_with_the_camera_to_base_mount_unless_tf_static_has_one(tmp_path):
    from depth_node.engine import open_engine
    from depth_node.pipeline import DepthPipeline, PipelineOptions
    from depth_node.stream import FrameStream

    engine = open_engine(ramp_model(tmp_path / "ramp.onnx"), "onnxruntime-cpu")

    def stream(odometry: str) -> FrameStream:
        values = params.resolve({"model": "m.onnx", "temporal_filter": 0.5, "odometry": odometry})
        return FrameStream(DepthPipeline(engine, PipelineOptions.from_params(values)), values, lambda event: None)

    stamp = SimpleNamespace(sec=2, nanosec=0)
    quarter_turn = SimpleNamespace(x=0.0, y=0.0, z=np.sqrt(0.5), w=np.sqrt(0.5))  # base_link yawed 90 degrees
    pose = SimpleNamespace(position=SimpleNamespace(x=3.0, y=1.0, z=0.0), orientation=quarter_turn)
    odometry = SimpleNamespace(header=SimpleNamespace(stamp=stamp, frame_id="odom"), child_frame_id="base_link",
                               pose=SimpleNamespace(pose=pose))  # fmt: skip
    from_topic = stream("odom")
    from_topic.on_odometry(odometry)
    camera = from_topic.odometry.camera_pose("cam", 2 * 10**9)
    # camera_to_base's default: the optical axis (z) along base_link's x, which the yaw turns onto odom's y
    np.testing.assert_allclose(camera[:3, 2], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(camera[:3, 3], [3.0, 1.0, 0.0])
    raised = SimpleNamespace(translation=SimpleNamespace(x=0.0, y=0.0, z=1.0),
                             rotation=SimpleNamespace(x=0.0, y=0.0, z=0.0, w=1.0))  # fmt: skip
    mount = SimpleNamespace(header=SimpleNamespace(stamp=stamp, frame_id="base_link"), child_frame_id="cam",
                            transform=raised)  # fmt: skip
    from_topic.on_transforms(SimpleNamespace(transforms=[mount]), static=True)  # /tf_static, where it is heard, wins
    np.testing.assert_allclose(from_topic.odometry.camera_pose("cam", 2 * 10**9)[:3, 3], [3.0, 1.0, 1.0])
    from_tf = stream("tf")
    from_tf.on_odometry(odometry)
    assert from_tf.odometry.camera_pose("cam", 2 * 10**9) is None  # the /tf path assumes no mount


def odometry_bag(bag: Path, out: Path) -> list[float]:
    """A copy of a synthetic bag with its /tf odometry on /odom as nav_msgs/Odometry and no /tf_static; returns the
    camera mount /tf_static had (the camera's pose in base_link, 16 numbers row-major) for `camera_to_base`."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    from depth_node.geometry import lookup_transform
    from distill.data.synth_bag import CAMERA_FRAME

    store = get_typestore(Stores.ROS2_HUMBLE)
    t = store.types
    static: dict[tuple[str, str], np.ndarray] = {}
    with AnyReader([bag]) as reader, Writer(out, version=8) as writer:
        connections = {
            c.topic: writer.add_connection(*(("/odom", ODOMETRY) if c.topic == "/tf" else (c.topic, c.msgtype)),
                                           typestore=store)
            for c in reader.connections if c.topic != "/tf_static"
        }  # fmt: skip
        for connection, stamp, raw in reader.messages():
            if connection.topic not in ("/tf", "/tf_static"):
                writer.write(connections[connection.topic], stamp, raw)
                continue
            for item in reader.deserialize(raw, connection.msgtype).transforms:
                if connection.topic == "/tf_static":
                    static[(item.header.frame_id, item.child_frame_id)] = transform_to_matrix(item.transform)
                    continue
                v, q = item.transform.translation, item.transform.rotation
                pose = t["geometry_msgs/msg/Pose"](
                    position=t["geometry_msgs/msg/Point"](x=v.x, y=v.y, z=v.z),
                    orientation=t["geometry_msgs/msg/Quaternion"](x=q.x, y=q.y, z=q.z, w=q.w),
                )
                zero = t["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
                message = t["nav_msgs/msg/Odometry"](
                    header=item.header, child_frame_id=item.child_frame_id,
                    pose=t["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
                    twist=t["geometry_msgs/msg/TwistWithCovariance"](
                        twist=t["geometry_msgs/msg/Twist"](linear=zero, angular=zero), covariance=np.zeros(36)),
                )  # fmt: skip
                writer.write(connections["/tf"], stamp, store.serialize_cdr(message, ODOMETRY))
    return lookup_transform(static, "base_link", CAMERA_FRAME).ravel().tolist()


def test_bag_tool_on_odometry_and_camera_to_base_matches_tf_and_tf_static(synth_root, tmp_path, capsys):
    bag = sorted((synth_root / "bags").iterdir())[0]
    mount = odometry_bag(bag, tmp_path / "odom_bag")
    model = ramp_model(tmp_path / "ramp.onnx", size=(64, 192), depth_range=(0.5, 80.0), scale=20.0, offset=5.0)
    smoothing = ["--model", str(model), "-p", "temporal_filter:=0.5", "-p", "temporal_tolerance:=0.2"]
    assert bag_main([str(bag), str(tmp_path / "tf"), *smoothing]) == 0
    odometry = ["-p", "odometry:=odom", "-p", f"camera_to_base:={mount}"]
    assert bag_main([str(tmp_path / "odom_bag"), str(tmp_path / "odom"), *smoothing, *odometry]) == 0
    assert bag_main([str(tmp_path / "odom_bag"), str(tmp_path / "plain"), "--model", str(model)]) == 0
    assert "pose of" not in capsys.readouterr().out  # every frame had a camera pose
    from_tf, from_odom, plain = depths(tmp_path / "tf"), depths(tmp_path / "odom"), depths(tmp_path / "plain")
    assert len(from_tf) == len(from_odom) >= 2
    assert (from_odom[1] != plain[1]).mean() > 0.05  # smoothed, as the /tf run is
    for tf_depth, odom_depth in zip(from_tf, from_odom, strict=True):
        np.testing.assert_allclose(odom_depth, tf_depth, rtol=1e-5)


def test_bag_tool_odometry_topic_must_exist_and_be_odometry(synth_root, tmp_path, capsys):
    bag = sorted((synth_root / "bags").iterdir())[0]
    model = ramp_model(tmp_path / "ramp.onnx", size=(64, 192))
    args = [
        str(bag),
        str(tmp_path / "out"),
        "--model",
        str(model),
        *"-p temporal_filter:=0.5 -p odometry:=odom".split(),
    ]
    assert bag_main(args) == 2
    assert capsys.readouterr().err.startswith(f"depth_node_bag: error: {bag}: no odom topic '/odom'; the bag has: ")
    assert bag_main([*args, "--odom-topic", "/tf"]) == 2
    assert (
        capsys.readouterr().err == "depth_node_bag: error: /tf is tf2_msgs/msg/TFMessage, not a nav_msgs/msg/Odometry\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("tf2_msgs") is not None, reason="tf2_msgs is installed: the node starts")
def test_the_node_without_tf2_msgs_refuses_the_filter_in_one_line(tmp_path):
    model = ramp_model(tmp_path / "ramp.onnx")
    command = [str(Path(sys.executable).parent / "depth_node"), "--ros-args", "-p", f"model:={model}",
               "-p", "temporal_filter:=0.5"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=os.environ | {"ROS_DOMAIN_ID": "77"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "depth_node: error: temporal_filter needs tf2_msgs (ros-tf2-msgs) to hear /tf: it is not importable "
        "(odometry:=odom takes nav_msgs/Odometry on 'odom' instead)"
    )
