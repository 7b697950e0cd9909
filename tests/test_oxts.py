"""Vehicle poses of the synthetic world: KITTI OXTS packets written and read back, the camera poses they give
against the renderer's own cameras, and /tf odometry in the bags read back with rosbags."""

from __future__ import annotations

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from distill.data.bag_poses import camera_poses as bag_camera_poses
from distill.data.bag_poses import read_odometry
from distill.data.kitti import camera_poses, read_calib
from distill.data.oxts import (
    ORIGIN,
    OXTS_FIELDS,
    oxts_from_poses,
    oxts_line,
    poses_from_oxts,
    read_oxts,
    rotation_rpy,
)
from distill.data.synth import drive_start_ns
from distill.data.synth_calib import make_rig
from distill.data.synth_sensors import camera_grid, camera_rays
from distill.data.world import FRAME_PERIOD, STYLES, build_street
from distill.errors import UserError

SIZE = (64, 192)


def drives(root):
    return sorted((root / "kitti_raw" / "2030_01_01").glob("*_sync"))


def test_oxts_packets_round_trip_to_the_poses_written(tmp_path):
    yaw = np.linspace(0.3, -1.2, 6)
    roll, pitch = np.linspace(-0.02, 0.03, 6), np.linspace(0.01, -0.04, 6)
    poses = np.tile(np.eye(4), (6, 1, 1))
    poses[:, :3, :3] = rotation_rpy(roll, pitch, yaw)
    poses[:, :3, 3] = np.cumsum(np.stack([np.cos(yaw), np.sin(yaw), 0.01 * yaw], -1) * 9.0, axis=0) + [500, -80, 3]
    packets = oxts_from_poses(poses, np.arange(6) * 0.1)
    assert packets.shape == (6, len(OXTS_FIELDS)) == (6, 30)
    assert packets[0, :3] == pytest.approx(ORIGIN, abs=1e-12)
    lines = [oxts_line(packet) for packet in packets]
    for index, line in enumerate(lines):
        (tmp_path / "oxts" / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / "oxts" / "data" / f"{index:010d}.txt").write_text(line)
    frames, read = read_oxts(tmp_path)
    assert frames.tolist() == list(range(6))
    read_back = poses_from_oxts(read)
    expected = poses.copy()
    expected[:, :3, 3] -= poses[0, :3, 3]  # the devkit's poses start at the first frame
    np.testing.assert_allclose(read_back, expected, atol=1e-6)  # micrometres over ~50 m
    assert packets[2, 8] == pytest.approx(9.0 / 0.1 * np.cos(0), rel=0.05)  # forward speed vf, m/s


def test_read_oxts_names_a_malformed_file(tmp_path):
    (tmp_path / "oxts" / "data").mkdir(parents=True)
    (tmp_path / "oxts" / "data" / "0000000000.txt").write_text("49.0 8.4 116.0\n")
    with pytest.raises(UserError, match="0000000000.txt does not hold 30 numbers"):
        read_oxts(tmp_path)
    with pytest.raises(UserError, match="no OXTS poses"):
        read_oxts(tmp_path / "missing")


def test_synth_oxts_give_the_renderers_camera_motion(synth_root):
    """Consecutive camera poses read from the written files relate the frames exactly as the renderer placed them."""
    drive = drives(synth_root)[0]
    calib = read_calib(drive.parent)
    poses = camera_poses(drive, calib)
    assert list(poses) == list(range(len(list((drive / "image_02" / "data").glob("*.png")))))
    assert (drive / "oxts" / "timestamps.txt").read_text().count("\n") == len(poses)
    assert (drive / "oxts" / "dataformat.txt").read_text().split() == list(OXTS_FIELDS)
    # Rebuild the renderer's camera of drive 1 (same entropy as write_world: seed 0, domain kitti, drive 1).
    style = STYLES["kitti"]
    street = build_street(style, np.random.default_rng([0, 0, 1]), len(poses))
    rig = make_rig(SIZE, style.date)
    rays = camera_rays(rig)
    cameras = []
    for frame in range(len(poses)):
        position, yaw = street.ego.pose(frame * FRAME_PERIOD)
        grid = camera_grid(rig, rays, position, yaw)
        world_from_camera = np.eye(4)
        world_from_camera[:3, :3], world_from_camera[:3, 3] = np.linalg.inv(grid.A), grid.origin
        cameras.append(world_from_camera)
    for frame in range(1, len(poses)):
        expected = np.linalg.inv(cameras[frame]) @ cameras[frame - 1]
        np.testing.assert_allclose(np.linalg.inv(poses[frame]) @ poses[frame - 1], expected, atol=1e-6)


def test_bag_tf_odometry_reads_back_with_rosbags(synth_root):
    drive = drives(synth_root)[0]
    bag = synth_root / "bags" / drive.name.removesuffix("_sync")
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        tf = [c for c in reader.connections if c.topic == "/tf"]
        assert [c.msgtype for c in tf] == ["tf2_msgs/msg/TFMessage"]
        messages = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=tf)]
        static = [c for c in reader.connections if c.topic == "/tf_static"]
        edges = [(t.header.frame_id, t.child_frame_id) for c, _, raw in reader.messages(connections=static)
                 for t in reader.deserialize(raw, c.msgtype).transforms]  # fmt: skip
    assert edges == [("velo_link", "camera_color_left"), ("base_link", "velo_link")]
    frames = len(list((drive / "image_02" / "data").glob("*.png")))
    assert len(messages) == frames
    first = messages[0].transforms[0]
    assert (first.header.frame_id, first.child_frame_id) == ("odom", "base_link")
    stamps, odometry = read_odometry(bag)
    start = drive_start_ns("2030_01_01", 1)
    assert stamps.tolist() == [start + frame * 100_000_000 for frame in range(frames)]
    np.testing.assert_allclose(odometry[0], np.eye(4), atol=1e-12)  # odom is where base_link started
    # The bag's camera motion is the OXTS camera motion.
    _, cameras = bag_camera_poses(bag, "camera_color_left")
    oxts = camera_poses(drive, read_calib(drive.parent))
    for frame in range(1, frames):
        np.testing.assert_allclose(
            np.linalg.inv(cameras[frame]) @ cameras[frame - 1], np.linalg.inv(oxts[frame]) @ oxts[frame - 1], atol=1e-6
        )
    with pytest.raises(UserError, match=r"no /tf transform map -> base_link \(found: odom -> base_link\)"):
        read_odometry(bag, parent="map")


def test_real_kitti_oxts_give_a_rigid_camera_pose(shared_data):
    """KITTI raw 2011_09_26_drive_0001 frame 5 (the sample holds that one): the devkit pose of camera 2."""
    drive = shared_data / "kitti_raw_sample" / "2011_09_26" / "2011_09_26_drive_0001_sync"
    poses = camera_poses(drive, read_calib(drive.parent))
    assert list(poses) == [5]
    rotation = poses[5][:3, :3]
    assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)
    heading = rotation @ [0.0, 0.0, 1.0]  # the optical axis points where the car heads: yaw -2.6217 rad
    assert np.arctan2(heading[1], heading[0]) == pytest.approx(-2.6217, abs=0.03)
    assert abs(heading[2]) < 0.05  # level, as the car
