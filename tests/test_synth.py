"""`distill synth`: KITTI layout and formats, determinism, LiDAR/ground-truth geometric exactness, rosbag2 read-back,
the shifted domain and argument errors. Small images and few frames keep it to seconds."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosDurability
from rosbags.typesys import Stores, get_typestore

from depth_node.geometry import points_to_depth_image, project_points, transform_points
from distill.data.kitti import camera_projection, read_calib, read_split, read_velodyne, velodyne_to_rectified
from distill.data.samples import read_depth_png
from distill.data.synth import plan_drives, write_calib, write_corpus, write_world
from distill.data.synth_bag import quaternion
from distill.data.synth_calib import make_rig
from distill.errors import UserError

SIZE = (128, 416)  # height, width: the CPU-friendly size the training demos use
TOPICS = {
    "/kitti/camera_color_left/image_raw": "sensor_msgs/msg/Image",
    "/kitti/camera_color_left/camera_info": "sensor_msgs/msg/CameraInfo",
    "/kitti/velo/pointcloud": "sensor_msgs/msg/PointCloud2",
    "/tf_static": "tf2_msgs/msg/TFMessage",
    "/tf": "tf2_msgs/msg/TFMessage",
}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9}$")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    write_world(out, frames=3, seed=7, domain="kitti", size=SIZE, bag="mcap")
    return out


@pytest.fixture(scope="module")
def shifted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shifted"
    write_world(out, frames=1, seed=7, domain="shifted", size=SIZE, bag="sqlite3")
    return out


def frames_of(root: Path) -> list[tuple[Path, Path, Path]]:
    """(image, scan, ground truth) paths of every frame, via the split files as a loader would find them."""
    frames = {}
    for split in ("train", "val", "test"):
        for drive, frame, _ in read_split(root / "splits" / f"{split}.txt"):
            sync = root / "kitti_raw" / drive
            name = f"{frame:010d}"
            gt = next((root / "data_depth_annotated").glob(f"*/{Path(drive).name}/proj_depth/groundtruth/image_02"))
            frames[sync, name] = (sync / "image_02" / "data" / f"{name}.png",
                                  sync / "velodyne_points" / "data" / f"{name}.bin", gt / f"{name}.png")  # fmt: skip
    return list(frames.values())


def calib_dir(root: Path) -> Path:
    return next((root / "kitti_raw").iterdir())


def test_plan_drives_keeps_splits_apart():
    def frames_per_split(drives):
        return {split: sum(d.frames for d in drives if d.split == split) for split in ("train", "val", "test")}

    for frames in (3, 20, 100, 333):
        drives = plan_drives(frames)
        assert sum(drive.frames for drive in drives) == frames
        assert min(frames_per_split(drives).values()) >= 1 and all(drive.frames >= 1 for drive in drives)
        assert len({drive.number for drive in drives}) == len(drives)
    assert frames_per_split(plan_drives(100)) == {"train": 70, "val": 15, "test": 15}
    assert len(plan_drives(1)) == 1


def test_calib_matches_real_kitti_at_full_size(shared_data, tmp_path):
    """At 375x1242 (HxW) the written calib files carry KITTI's keys and numbers; the bag TF equals the real sample's."""
    real = read_calib(shared_data / "kitti_raw_sample" / "2011_09_26")
    rig = make_rig((375, 1242), "2030_01_01")
    write_calib(tmp_path / "2030_01_01", rig)
    ours = read_calib(tmp_path / "2030_01_01")
    assert set(real) <= set(ours)
    for key in ("P_rect_02", "R_rect_00", "R", "T", "S_rect_02"):
        np.testing.assert_allclose(ours[key], real[key], rtol=1e-5, atol=1e-6, err_msg=key)
    text = (tmp_path / "2030_01_01" / "calib_cam_to_cam.txt").read_text()
    assert re.search(r"^P_rect_02: (-?\d\.\d{6}e[+-]\d\d ){11}-?\d\.\d{6}e[+-]\d\d$", text, re.M)
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    sample = shared_data / "kitti_rosbag2_sample" / "kitti_0001_f5_mcap"
    with AnyReader([sample], default_typestore=typestore) as reader:
        connection = next(c for c in reader.connections if c.topic == "/tf_static")
        _, _, raw = next(reader.messages(connections=[connection]))
        expected = reader.deserialize(raw, connection.msgtype).transforms[0].transform
    rotation, translation = rig.camera_pose_in_velo()
    np.testing.assert_allclose(translation, [expected.translation.x, expected.translation.y, expected.translation.z],
                               atol=1e-6)  # fmt: skip
    q = expected.rotation
    np.testing.assert_allclose(quaternion(rotation), [q.x, q.y, q.z, q.w], atol=1e-6)


def test_layout_and_formats(world):
    calib = read_calib(calib_dir(world))
    P, (height, width) = camera_projection(calib, 2)
    assert (height, width) == SIZE
    assert P[0, 0] == pytest.approx(721.5377 * SIZE[1] / 1242, rel=1e-6)
    assert P[1, 2] == pytest.approx((172.854 + 0.5) * SIZE[0] / 375 - 0.5, rel=1e-6)
    frames = frames_of(world)
    assert len(frames) == 3
    for image_path, scan_path, gt_path in frames:
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        gt = cv2.imread(str(gt_path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (height, width, 3)
        assert gt.dtype == np.uint16 and gt.shape == (height, width)
        assert (gt > 0).mean() > 0.5 and 0 < gt.max() <= 65535
        scan = read_velodyne(scan_path)
        assert scan.dtype == np.float32 and len(scan) > 50_000
        assert 0.0 <= scan[:, 3].min() and scan[:, 3].max() <= 1.0
        assert np.linalg.norm(scan[:, :3], axis=1).max() <= 120.0
    drives = {split: {drive for drive, _, _ in read_split(world / "splits" / f"{split}.txt")} for split in
              ("train", "val", "test")}  # fmt: skip
    assert not drives["train"] & drives["test"] and not drives["train"] & drives["val"]
    test_drive = Path(next(iter(drives["test"]))).name
    assert (world / "data_depth_annotated" / "val" / test_drive).is_dir()
    for sync in (calib_dir(world)).glob("*_sync"):
        stamps = (sync / "image_02" / "timestamps.txt").read_text().splitlines()
        assert all(TIMESTAMP.match(line) for line in stamps)
        for name in ("timestamps.txt", "timestamps_start.txt", "timestamps_end.txt"):
            assert len((sync / "velodyne_points" / name).read_text().splitlines()) == len(stamps)


@pytest.mark.slow
def test_same_seed_same_bytes(world, tmp_path):
    again = tmp_path / "again"
    write_world(again, frames=3, seed=7, domain="kitti", size=SIZE, bag="mcap")
    files = sorted(path.relative_to(world) for path in world.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(again) for path in again.rglob("*") if path.is_file())
    for relative in files:
        assert (world / relative).read_bytes() == (again / relative).read_bytes(), relative


def inverse_depth_smooth(gt: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is valid and lies on one plane: inverse depth is affine in (u, v) on a plane,
    so its second differences vanish there and jump at occlusion edges and creases (the local gradient test)."""
    valid = gt > 0
    inverse = np.where(valid, 1.0 / np.maximum(gt, 1e-6), 0.0)
    smooth = np.zeros_like(valid)
    centre = inverse[1:-1, 1:-1]
    second_u = np.abs(inverse[1:-1, :-2] - 2 * centre + inverse[1:-1, 2:])
    second_v = np.abs(inverse[:-2, 1:-1] - 2 * centre + inverse[2:, 1:-1])
    window = np.lib.stride_tricks.sliding_window_view(valid, (3, 3)).all(axis=(-1, -2))
    smooth[1:-1, 1:-1] = window & (np.maximum(second_u, second_v) <= 2e-3 * centre)
    return smooth


def check_scan_against_ground_truth(root: Path) -> None:
    """Each scan, projected with the calib files as KITTI's devkit does, lands on the dense ground truth to 1 cm."""
    calib = read_calib(calib_dir(root))
    P, (height, width) = camera_projection(calib, 2)
    for _, scan_path, gt_path in frames_of(root):
        gt = read_depth_png(gt_path, 1 / 256)
        points = transform_points(velodyne_to_rectified(calib), read_velodyne(scan_path)[:, :3])
        # 1. The evaluation protocol: nearest point per pixel, rounded to the pixel. Where the ground truth is flat
        #    to 2 cm over 3x3 pixels, rounding to the pixel centre cannot move the depth by more than 1 cm.
        sparse = points_to_depth_image(points, P, height, width)
        window = np.lib.stride_tricks.sliding_window_view(np.pad(gt, 1, mode="edge"), (3, 3))
        flat = (sparse > 0) & (window.min(axis=(-1, -2)) > 0) & (np.ptp(window, axis=(-1, -2)) <= 0.02)
        error = (sparse - gt)[flat]
        visible = error < 0.05  # farther = hidden from the camera by the 0.27 m parallax between the sensors
        assert flat.sum() > 100 and visible.mean() > 0.8
        assert np.mean(np.abs(error[visible]) <= 0.01) >= 0.95
        # 2. Exact sub-pixel positions: interpolate inverse depth (affine on planes) between pixel centres.
        u, v, z = project_points(points, P)
        inside = (z > 1.0) & (u >= 0) & (u < width - 1) & (v >= 0) & (v < height - 1)
        u, v, z = u[inside], v[inside], z[inside]
        u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
        fu, fv = u - u0, v - v0
        smooth = inverse_depth_smooth(gt)
        corners = [(v0, u0), (v0, u0 + 1), (v0 + 1, u0), (v0 + 1, u0 + 1)]
        usable = np.all([smooth[rows, cols] for rows, cols in corners], axis=0)
        inverse = [1.0 / np.maximum(gt[rows, cols], 1e-6) for rows, cols in corners]
        interpolated = 1.0 / (
            (inverse[0] * (1 - fu) + inverse[1] * fu) * (1 - fv) + (inverse[2] * (1 - fu) + inverse[3] * fu) * fv
        )
        error = (z - interpolated)[usable]
        visible = error < 0.05
        assert usable.sum() > 1000 and visible.mean() > 0.8
        assert np.mean(np.abs(error[visible]) <= 0.01) >= 0.95
        assert np.mean(error[visible] < -0.01) < 0.01  # a point in front of the visible surface is impossible


def test_scan_lands_on_ground_truth(world):
    check_scan_against_ground_truth(world)


def test_sky_is_invalid_and_lidar_sees_only_valid_pixels(world):
    calib = read_calib(calib_dir(world))
    P, (height, width) = camera_projection(calib, 2)
    for image_path, scan_path, gt_path in frames_of(world):
        gt = read_depth_png(gt_path, 1 / 256)
        image = cv2.imread(str(image_path))[..., ::-1].astype(int)
        sky = gt == 0
        rows, cols = np.nonzero(sky)
        # Invalid only above the horizon (plus the road beyond 255 m just below it), and blue-ish there.
        up = velodyne_to_rectified(calib)[:3, 2]  # world up (the Velodyne's z) in camera coordinates
        K = P[:, :3]
        horizon = K[1, 2] - K[1, 1] * (up[0] * (cols - K[0, 2]) / K[0, 0] + up[2]) / up[1]
        assert sky[: height // 4].mean() > 0.05 and np.all(rows <= horizon + K[1, 1] * 2.5 / 255 + 1)
        assert np.mean(image[sky][:, 2] > image[sky][:, 0]) > 0.9
        points = transform_points(velodyne_to_rectified(calib), read_velodyne(scan_path)[:, :3])
        sparse = points_to_depth_image(points, P, height, width)
        assert np.mean(gt[sparse > 0] == 0) < 0.01


def test_bag_reads_back(world):
    calib = read_calib(calib_dir(world))
    P, (height, width) = camera_projection(calib, 2)
    image_path, scan_path, _ = frames_of(world)[0]
    bag = next((world / "bags").iterdir())
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == TOPICS
        tf = next(c for c in reader.connections if c.topic == "/tf_static")
        assert tf.ext.offered_qos_profiles[0].durability == QosDurability.TRANSIENT_LOCAL
        first = {}
        for connection, stamp, raw in reader.messages():
            first.setdefault(connection.topic, (stamp, reader.deserialize(raw, connection.msgtype)))
    info, image = first["/kitti/camera_color_left/camera_info"][1], first["/kitti/camera_color_left/image_raw"][1]
    cloud = first["/kitti/velo/pointcloud"][1]
    assert info.k[0] == pytest.approx(P[0, 0]) and info.distortion_model == "plumb_bob" and info.p[3] == 0.0
    assert (info.height, info.width) == (height, width) and image.encoding == "rgb8"
    assert first["/kitti/camera_color_left/image_raw"][0] == first["/kitti/velo/pointcloud"][0]
    np.testing.assert_array_equal(image.data.reshape(height, width, 3), cv2.imread(str(image_path))[..., ::-1])
    scan = read_velodyne(scan_path)
    assert cloud.point_step == 16 and [f.name for f in cloud.fields] == ["x", "y", "z", "intensity"]
    np.testing.assert_array_equal(cloud.data.view(np.float32).reshape(-1, 4), scan)
    # K @ (TF: velo -> camera) reproduces P_rect_02 @ R_rect_00 @ [R|T] on the scan (SOURCE.txt convention).
    transform = first["/tf_static"][1].transforms[0].transform
    q, t = transform.rotation, transform.translation
    x, y, z, w = q.x, q.y, q.z, q.w
    rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])  # fmt: skip
    camera = (scan[:, :3] - [t.x, t.y, t.z]) @ rotation  # camera pose in velo -> points in camera
    u_bag, v_bag, _ = project_points(camera, np.concatenate([np.reshape(info.k, (3, 3)), np.zeros((3, 1))], 1))
    u, v, depth = project_points(transform_points(velodyne_to_rectified(calib), scan[:, :3]), P)
    front = depth > 2.0
    assert np.abs(u_bag - u)[front].max() < 0.05 and np.abs(v_bag - v)[front].max() < 0.05


def test_shifted_domain_differs(world, shifted):
    kitti_calib, shifted_calib = read_calib(calib_dir(world)), read_calib(calib_dir(shifted))
    assert shifted_calib["P_rect_02"][0] < 0.9 * kitti_calib["P_rect_02"][0]
    kitti_camera = np.linalg.inv(velodyne_to_rectified(kitti_calib))[:3, 3]  # camera position in the Velodyne frame
    shifted_camera = np.linalg.inv(velodyne_to_rectified(shifted_calib))[:3, 3]
    assert shifted_camera[2] - kitti_camera[2] > 0.3  # mounted higher relative to the Velodyne
    kitti_images = [cv2.imread(str(image)).reshape(-1, 3).mean(0) for image, _, _ in frames_of(world)]
    shifted_image = cv2.imread(str(frames_of(shifted)[0][0])).reshape(-1, 3).mean(0)
    assert np.abs(shifted_image - np.mean(kitti_images, axis=0)).max() > 10  # a different palette and light
    check_scan_against_ground_truth(shifted)
    bag = next((shifted / "bags").iterdir())
    assert next(bag.glob("*.db3")).is_file()
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        assert {c.topic for c in reader.connections} == set(TOPICS)
        connection = next(c for c in reader.connections if c.topic.endswith("camera_info"))
        _, _, raw = next(reader.messages(connections=[connection]))
        assert reader.deserialize(raw, connection.msgtype).k[0] == pytest.approx(shifted_calib["P_rect_02"][0])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"frames": 0}, "--frames"),
        ({"size": (10, 20)}, "--size 10x20 is out of range; height 32-2048"),
        ({"domain": "mars"}, "--domain"),
        ({"bag": "rosbag1"}, "--bag"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_bad_arguments_raise_user_error(tmp_path, arguments, message):
    settings = {"frames": 1, "seed": 0, "domain": "kitti", "size": SIZE, "bag": "none", **arguments}
    with pytest.raises(UserError, match=re.escape(message)):
        write_world(tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_unusable_output_folder_raises_user_error(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("not a folder")
    for out, message in ((tmp_path / "full", "not empty"), (tmp_path / "file", "not a folder"),
                         (tmp_path / "file" / "below", "cannot create")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            write_world(out, frames=1, seed=0, size=SIZE, bag="none")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_corpus_holds_each_domain_under_its_own_day(tmp_path):
    out = tmp_path / "corpus"
    write_corpus(out, [("overcast", 3, 7), ("van", 3, 7)], size=(32, 96), bag="none")
    days = sorted(p.name for p in (out / "kitti_raw").iterdir())
    assert days == ["2032_11_03", "2033_04_20"]
    listed = [read_split(out / "splits" / f"{split}.txt") for split in ("train", "val", "test")]
    assert {Path(drive).parent.name for split in listed for drive, _, _ in split} == set(days)
    assert sum(len(split) for split in listed) == 6 and len(frames_of(out)) == 6
    focal = [camera_projection(read_calib(out / "kitti_raw" / day), 2)[0][0, 0] for day in days]
    assert focal[0] > focal[1]  # overcast's long lens, van's wide one
    van = tmp_path / "van"
    write_world(van, frames=3, seed=7, domain="van", size=(32, 96), bag="none")
    drive = "2033_04_20_drive_0001_sync/image_02/data/0000000000.png"
    assert (van / "kitti_raw" / "2033_04_20" / drive).read_bytes() == (
        out / "kitti_raw" / "2033_04_20" / drive
    ).read_bytes()
    with pytest.raises(UserError, match="each domain at most once"):
        write_corpus(tmp_path / "twice", [("van", 1, 0), ("van", 1, 1)], size=(32, 96))
