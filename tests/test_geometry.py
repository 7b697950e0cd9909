"""depth_node.geometry and codec: back-projection, PointCloud2 packing and parsing, LiDAR to sparse depth, on synthetic
arrays, real sensor_msgs messages and the real KITTI rosbag2 sample."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from depth_node.codec import (
    camera_info_to_P,
    empty_cloud,
    make_pointcloud2,
    pack_cloud,
    pointcloud2_to_xyz,
    scale_camera_info,
    set_cloud_colours,
    transform_to_matrix,
    validate_camera_info,
)
from depth_node.geometry import backproject, lidar_to_depth, points_to_depth_image, project_points, transform_points
from depth_node.image_codec import compressed_to_numpy, image_to_numpy, to_rgb

RNG = np.random.default_rng(0)
P_MONO = np.array([[721.5377, 0.0, 609.5593, 0.0], [0.0, 721.5377, 172.854, 0.0], [0.0, 0.0, 1.0, 0.0]])
KITTI_BAG = Path("kitti_rosbag2_sample") / "kitti_0001_f5_mcap"


def _depth(height: int = 12, width: int = 17) -> np.ndarray:
    depth = RNG.uniform(0.5, 60.0, (height, width)).astype(np.float32)
    depth[1, 1], depth[1, 4], depth[2, 2], depth[3, 5], depth[4, 3] = np.nan, np.inf, -np.inf, 0.0, -2.0
    return depth


def test_backproject_then_project_recovers_the_pixels() -> None:
    depth = _depth()
    points = backproject(depth, P_MONO)
    assert points.shape == (12, 17, 3) and points.dtype == np.float32
    valid = np.isfinite(depth) & (depth > 0)
    u, v, z = project_points(points[valid], P_MONO)
    rows, columns = np.nonzero(valid)
    np.testing.assert_allclose(u, columns, atol=1e-3)
    np.testing.assert_allclose(v, rows, atol=1e-3)
    np.testing.assert_allclose(z, depth[valid], rtol=1e-6)


def test_backproject_matches_the_pinhole_formula_at_one_pixel() -> None:
    depth = np.full((4, 5), 2.0, np.float32)
    point = backproject(depth, [[100.0, 0, 2.0, 0], [0, 50.0, 1.0, 0], [0, 0, 1, 0]])[3, 4]
    np.testing.assert_allclose(point, [(4 - 2.0) * 2.0 / 100.0, (3 - 1.0) * 2.0 / 50.0, 2.0])


def test_invalid_depth_gives_nan_points() -> None:
    depth = _depth()
    points = backproject(depth, P_MONO)
    invalid = ~(np.isfinite(depth) & (depth > 0))
    assert invalid.sum() == 5
    assert np.isnan(points[invalid]).all()
    assert np.isfinite(points[~invalid]).all()


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_stride_keeps_every_nth_pixel_at_its_true_coordinates(stride: int) -> None:
    depth = _depth()
    strided = backproject(depth, P_MONO, stride=stride)
    assert strided.shape == (-(-12 // stride), -(-17 // stride), 3)
    np.testing.assert_array_equal(strided, backproject(depth, P_MONO)[::stride, ::stride])
    with pytest.raises(ValueError, match="stride"):
        backproject(depth, P_MONO, stride=0)


def test_backproject_ignores_tx_like_depth_image_proc() -> None:
    stereo_right = P_MONO.copy()
    stereo_right[0, 3] = -721.5377 * 0.54
    depth = _depth()
    np.testing.assert_array_equal(backproject(depth, stereo_right), backproject(depth, P_MONO))


def _cloud_inputs(height: int = 6, width: int = 9) -> tuple[np.ndarray, np.ndarray]:
    points = backproject(_depth(height, width), P_MONO)
    rgb = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return points, rgb


@pytest.mark.ros
def test_make_pointcloud2_layout() -> None:
    from sensor_msgs.msg import PointCloud2, PointField
    from std_msgs.msg import Header

    points, rgb = _cloud_inputs()
    header = Header(frame_id="camera_color_left")
    for colour, names, step in ((None, ["x", "y", "z"], 12), (rgb, ["x", "y", "z", "rgb"], 16)):
        cloud = make_pointcloud2(header, points, colour)
        assert isinstance(cloud, PointCloud2) and cloud.header == header
        assert (cloud.height, cloud.width, cloud.is_dense, cloud.is_bigendian) == (6, 9, False, False)
        assert (cloud.point_step, cloud.row_step, len(cloud.data)) == (step, step * 9, step * 9 * 6)
        assert [f.name for f in cloud.fields] == names
        assert all(f.datatype == PointField.FLOAT32 and f.count == 1 for f in cloud.fields)
        assert [f.offset for f in cloud.fields] == [0, 4, 8, 12][: len(names)]
        xyz = np.frombuffer(bytes(cloud.data), np.float32).reshape(6, 9, step // 4)[..., :3]
        np.testing.assert_array_equal(xyz, points)  # NaN == NaN here


@pytest.mark.ros
def test_cloud_filled_in_place_is_the_message_payload() -> None:
    """backproject into empty_cloud(...).points: make_pointcloud2 publishes that very buffer, with its colours."""
    from std_msgs.msg import Header

    depth = RNG.uniform(1.0, 50.0, (6, 9)).astype(np.float32)
    depth[0, 0] = np.nan
    rgb = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    projection = np.array([[50.0, 0, 4.0, 0], [0, 50.0, 3.0, 0], [0, 0, 1, 0]])
    cloud = empty_cloud(6, 9, colour=True)
    backproject(depth, projection, out=cloud.points)
    set_cloud_colours(cloud, rgb)
    message = make_pointcloud2(Header(), cloud)
    assert message.data is cloud.payload
    reference = make_pointcloud2(Header(), backproject(depth, projection), rgb)
    assert bytes(message.data) == bytes(reference.data)


@pytest.mark.ros
def test_packed_cloud_parses_back_with_its_colours() -> None:
    from std_msgs.msg import Header

    points, rgb = _cloud_inputs()
    cloud = make_pointcloud2(Header(), points, rgb)
    finite = np.isfinite(points).all(axis=2)
    np.testing.assert_array_equal(pointcloud2_to_xyz(cloud), points[finite])
    xyz_rgb = pointcloud2_to_xyz(cloud, fields=("x", "y", "z", "rgb"))
    packed = np.ascontiguousarray(xyz_rgb[:, 3]).view(np.uint32)  # PCL: uint32 0x00RRGGBB stored in a float32
    unpacked = np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF], axis=1)
    np.testing.assert_array_equal(unpacked, rgb[finite])
    assert not (packed >> 24).any()


def _foreign_cloud() -> tuple[SimpleNamespace, np.ndarray]:
    """A cloud laid out unlike ours: big-endian float64 x, y, z after an int8, uint16 intensity, padded rows."""
    from sensor_msgs.msg import PointCloud2, PointField

    xyz = RNG.normal(0.0, 10.0, (2, 3, 3))
    xyz[1, 2, 0] = np.nan
    point = np.dtype({"names": ["tag", "x", "y", "z", "i"], "formats": ["i1", ">f8", ">f8", ">f8", ">u2"],
                      "offsets": [0, 4, 12, 20, 28], "itemsize": 32})  # fmt: skip
    rows = np.zeros((2, 3), point)
    rows["x"], rows["y"], rows["z"], rows["i"] = xyz[..., 0], xyz[..., 1], xyz[..., 2], [[1, 2, 3], [4, 5, 6]]
    data = np.concatenate([rows.view(np.uint8).reshape(2, 96), np.full((2, 8), 0xEE, np.uint8)], axis=1)
    fields = [PointField(name="tag", offset=0, datatype=PointField.INT8, count=1)]
    fields += [PointField(name=n, offset=o, datatype=PointField.FLOAT64, count=1) for n, o in zip("xyz", (4, 12, 20))]
    fields += [PointField(name="intensity", offset=28, datatype=PointField.UINT16, count=1)]
    cloud = PointCloud2(height=2, width=3, fields=fields, is_bigendian=True, point_step=32, row_step=104)
    cloud.data = data.tobytes()
    return cloud, np.concatenate([xyz, np.array([[1, 2, 3], [4, 5, 6]])[..., None]], axis=2).reshape(-1, 4)


@pytest.mark.ros
def test_pointcloud2_to_xyz_reads_any_layout_and_drops_nan() -> None:
    cloud, expected = _foreign_cloud()
    values = pointcloud2_to_xyz(cloud, fields=("x", "y", "z", "intensity"))
    assert values.dtype == np.float32 and values.shape == (5, 4)
    np.testing.assert_allclose(values, np.delete(expected, 5, axis=0).astype(np.float32))


@pytest.mark.ros
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("fields", "no field 'z'"),
        ("data", "truncated PointCloud2"),
        ("point_step", "point_step 24 is too small for field 'z'"),
        ("row_step", "row_step 90 < point_step 32"),
        ("datatype", "field 'y' has datatype 0"),
    ],
)
def test_malformed_clouds_raise_value_error(change: str, match: str) -> None:
    cloud, _ = _foreign_cloud()
    if change == "fields":
        cloud.fields = [f for f in cloud.fields if f.name != "z"]
    elif change == "data":
        cloud.data = bytes(cloud.data)[:-1]
    elif change == "point_step":
        cloud.point_step = 24
    elif change == "row_step":
        cloud.row_step = 90
    else:
        cloud.fields[2].datatype = 0
    with pytest.raises(ValueError, match=match):
        pointcloud2_to_xyz(cloud)


def test_empty_cloud_gives_no_points() -> None:
    empty = SimpleNamespace(
        height=1, width=0, point_step=16, row_step=0, is_bigendian=False, data=b"",
        fields=[SimpleNamespace(name=n, offset=o, datatype=7, count=1) for n, o in zip("xyz", (0, 4, 8))],
    )  # fmt: skip
    assert pointcloud2_to_xyz(empty).shape == (0, 3)


def test_pack_rejects_mismatched_inputs() -> None:
    points, rgb = _cloud_inputs()
    with pytest.raises(ValueError, match=r"points must be \(H, W, 3\)"):
        pack_cloud(points.reshape(-1, 3))
    with pytest.raises(ValueError, match="rgb must be uint8"):
        pack_cloud(points, rgb[:-1])
    with pytest.raises(ValueError, match="rgb must be uint8"):
        pack_cloud(points, rgb.astype(np.float32))
    with pytest.raises(ValueError, match="no rgb field"):
        set_cloud_colours(empty_cloud(6, 9), rgb)
    with pytest.raises(ValueError, match="out must be float32"):
        backproject(np.ones((6, 9), np.float32), np.eye(3, 4), out=np.empty((6, 9, 3), np.float64))


def test_transform_to_matrix_rotates_and_translates() -> None:
    half_turn_z = SimpleNamespace(
        translation=SimpleNamespace(x=1.0, y=2.0, z=3.0), rotation=SimpleNamespace(x=0.0, y=0.0, z=2.0, w=0.0)
    )  # an unnormalised quaternion, normalised on the way
    matrix = transform_to_matrix(half_turn_z)
    np.testing.assert_allclose(transform_points(matrix, [[1.0, 0.0, 0.0]]), [[0.0, 2.0, 3.0]], atol=1e-12)


def test_lidar_to_depth_is_transform_then_z_buffered_projection() -> None:
    camera_from_lidar = np.eye(4)
    camera_from_lidar[:3, :3] = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]  # lidar x forward -> camera z forward
    lidar = np.array([[10.0, 0.0, 0.0], [20.0, 0.0, 0.0], [5.0, -1.0, 0.5], [-5.0, 0.0, 0.0]])
    depth = lidar_to_depth(lidar, camera_from_lidar, P_MONO, 375, 1242)
    assert np.count_nonzero(depth) == 2  # the point behind is dropped, the farther of two on one pixel hidden
    assert depth[173, 610] == pytest.approx(10.0)
    u, v, _ = project_points(transform_points(camera_from_lidar, lidar[2:3]), P_MONO)
    assert depth[int(np.rint(v[0])), int(np.rint(u[0]))] == pytest.approx(5.0)
    np.testing.assert_array_equal(depth, points_to_depth_image(lidar @ camera_from_lidar[:3, :3].T, P_MONO, 375, 1242))


@pytest.fixture(scope="module")
def kitti_bag(shared_data: Path) -> dict:
    """The last message of every topic of the real KITTI rosbag2 sample (one frame), read with rosbags."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    messages = {}
    with AnyReader([shared_data / KITTI_BAG], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        for connection, _, raw in reader.messages():
            messages[connection.topic] = reader.deserialize(raw, connection.msgtype)
    return messages


def test_real_kitti_bag_decodes_end_to_end(kitti_bag: dict) -> None:
    rgb = to_rgb(kitti_bag["/kitti/camera_color_left/image_raw"])
    assert rgb.shape == (375, 1242, 3) and rgb.dtype == np.uint8
    # The compressed topic holds the original PNG: lossless, so the pixels must be identical.
    compressed = compressed_to_numpy(kitti_bag["/kitti/camera_color_left/image_raw/compressed"])
    np.testing.assert_array_equal(compressed, rgb)
    info = kitti_bag["/kitti/camera_color_left/camera_info"]
    validate_camera_info(info)
    projection = camera_info_to_P(info)
    np.testing.assert_allclose(projection[:, :3], [[721.5377, 0, 609.5593], [0, 721.5377, 172.854], [0, 0, 1]])
    half = camera_info_to_P(scale_camera_info(info, 621, 188))  # rosbags messages scale like rclpy ones
    np.testing.assert_allclose(half[0, :3], [721.5377 / 2, 0.0, (609.5593 + 0.5) / 2 - 0.5])
    scan = pointcloud2_to_xyz(kitti_bag["/kitti/velo/pointcloud"], fields=("x", "y", "z", "intensity"))
    assert scan.shape == (121948, 4) and 0.0 <= scan[:, 3].min() and scan[:, 3].max() <= 1.0
    (tf,) = kitti_bag["/tf_static"].transforms
    assert (tf.header.frame_id, tf.child_frame_id) == ("velo_link", "camera_color_left")
    camera_from_lidar = np.linalg.inv(transform_to_matrix(tf.transform))  # TF maps child (camera) into parent
    sparse = lidar_to_depth(scan[:, :3], camera_from_lidar, projection, 375, 1242)
    # SOURCE.txt: 19,168 points land in the image; the z-buffer merges a few onto shared pixels.
    assert 18_500 <= np.count_nonzero(sparse) <= 19_168
    truth = image_to_numpy(kitti_bag["/kitti/camera_color_left/depth_gt"])
    both = (sparse > 0) & np.isfinite(truth)
    assert both.sum() > 5000
    # The ground truth is motion-compensated and accumulated, a plain projection is not: compare with a tolerance.
    assert np.mean(np.abs(sparse[both] - truth[both]) < 0.3) > 0.85
