"""distill.verbs.viz: colour maps, PLY files, cloud previews and the `distill viz` verb on images, datasets and bags."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from distill.drawing import (
    colorize_depth,
    colorize_error,
    display_range,
    labelled,
    mosaic,
    render_cloud,
    write_ply,
)
from distill.errors import UserError
from distill.verbs.viz import run_viz, source_kind

IMAGE_TOPIC = "/kitti/camera_color_left/image_raw"


def colormap_rgb(code: int, colormap: int) -> np.ndarray:
    """RGB of one 0-255 code through an OpenCV colormap."""
    return cv2.applyColorMap(np.full((1, 1), code, np.uint8), colormap)[0, 0, ::-1]


def read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """Header lines and vertex records of a binary little-endian PLY written by write_ply."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    names = [line.split()[-1] for line in header if line.startswith("property")]
    types = {"float": "<f4", "uchar": "u1"}
    dtype = [(line.split()[-1], types[line.split()[1]]) for line in header if line.startswith("property")]
    assert [name for name, _ in dtype] == names
    return header, np.frombuffer(data[end:], dtype=dtype)


def test_colorize_depth_log_scale_near_warm_invalid_black():
    depth = np.array([[1.0, 100.0, 10.0, 0.0, np.nan, np.inf, -np.inf, 500.0]], np.float32)
    rgb = colorize_depth(depth, 1.0, 100.0, "turbo")
    assert rgb.shape == (1, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], colormap_rgb(255, cv2.COLORMAP_TURBO))  # nearest: top of the map
    np.testing.assert_array_equal(rgb[0, 1], colormap_rgb(0, cv2.COLORMAP_TURBO))  # farthest: bottom
    np.testing.assert_array_equal(rgb[0, 2], colormap_rgb(128, cv2.COLORMAP_TURBO))  # log midpoint of 1..100 m
    assert not rgb[0, 3:7].any()  # 0, NaN, +Inf, -Inf: black
    np.testing.assert_array_equal(rgb[0, 7], rgb[0, 1])  # beyond vmax clips to the far colour


def test_colorize_error_scale_and_missing_ground_truth():
    gt = np.array([[10.0, 10.0, 10.0, 0.0]], np.float32)
    pred = np.array([[10.0, 11.5, 30.0, 5.0]], np.float32)
    rgb = colorize_error(pred, gt, max_error=0.3, colormap="viridis")
    np.testing.assert_array_equal(rgb[0, 0], colormap_rgb(0, cv2.COLORMAP_VIRIDIS))
    np.testing.assert_array_equal(rgb[0, 1], colormap_rgb(128, cv2.COLORMAP_VIRIDIS))  # 0.15 of 0.3
    np.testing.assert_array_equal(rgb[0, 2], colormap_rgb(255, cv2.COLORMAP_VIRIDIS))  # clipped
    assert not rgb[0, 3].any()


def test_unknown_colormap_is_a_user_error():
    with pytest.raises(UserError, match="unknown colormap 'jet2'"):
        colorize_depth(np.ones((2, 2), np.float32), 1, 2, "jet2")


def test_display_range_uses_valid_values_of_all_maps():
    a = np.array([[0.0, np.nan, 2.0]], np.float32)
    b = np.linspace(2.0, 50.0, 100, dtype=np.float32)[None]
    vmin, vmax = display_range(a, b, low=0, high=100)
    assert (vmin, vmax) == pytest.approx((2.0, 50.0))
    assert display_range(np.zeros((3, 3))) == (1.0, 80.0)


def test_ply_round_trip_with_and_without_colours(tmp_path):
    points = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    colors = np.random.default_rng(1).integers(0, 256, (50, 3), dtype=np.uint8)
    header, vertices = read_ply(write_ply(tmp_path / "c.ply", points, colors))
    assert header[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 50"]
    np.testing.assert_array_equal(np.stack([vertices[a] for a in "xyz"], 1), points)
    np.testing.assert_array_equal(np.stack([vertices[c] for c in ("red", "green", "blue")], 1), colors)
    header, vertices = read_ply(write_ply(tmp_path / "p.ply", points))
    assert "property uchar red" not in header and len(vertices) == 50


def plane(z: float, half: float, count: int) -> np.ndarray:
    """count x count points on the square |x|, |y| <= half at depth z."""
    grid = np.linspace(-half, half, count, dtype=np.float32)
    x, y = np.meshgrid(grid, grid)
    return np.stack([x.ravel(), y.ravel(), np.full(x.size, z, np.float32)], axis=1)


def test_render_cloud_z_buffer_keeps_the_nearest_point():
    near, far = plane(10.0, 1.0, 60), plane(20.0, 1.0, 60)
    colors = np.concatenate([np.tile([255, 0, 0], (len(near), 1)), np.tile([0, 0, 255], (len(far), 1))]).astype(
        np.uint8
    )
    for order in (slice(None), slice(None, None, -1)):  # whatever the drawing order
        points = np.concatenate([near, far])[order]
        picture = render_cloud(points, colors[order], size=(120, 160), yaw_deg=0, pitch_deg=0)
        np.testing.assert_array_equal(picture[60, 80], [255, 0, 0])
    assert (picture[0, 0] == 24).all()  # background


def test_render_cloud_skips_invalid_points_and_handles_empty_clouds():
    picture = render_cloud(np.full((10, 3), np.nan, np.float32), size=(30, 40))
    assert picture.shape == (30, 40, 3) and (picture == 24).all()
    points = np.concatenate([plane(5.0, 1.0, 20), np.full((5, 3), np.nan, np.float32)])
    assert (render_cloud(points, size=(30, 40)) != 24).any()  # coloured by depth without colours


def test_labelled_and_mosaic_shapes():
    tile = np.full((10, 20, 3), 200, np.uint8)
    assert labelled(tile, "x", height=8).shape == (18, 20, 3)
    grid = mosaic([[tile, tile], [tile]], gap=2)
    assert grid.shape == (22, 42, 3)
    assert not grid[10:12].any() and not grid[:, 20:22].any() and not grid[12:, 20:].any()


def test_source_kind(tmp_path):
    (tmp_path / "pictures").mkdir()
    cv2.imwrite(str(tmp_path / "pictures" / "a.png"), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "bag").mkdir()
    (tmp_path / "bag" / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    (tmp_path / "notes.txt").write_text("x")
    assert source_kind(tmp_path / "pictures") == "images"
    assert source_kind(tmp_path / "pictures" / "a.png") == "image"
    assert source_kind(tmp_path / "bag") == "bag"
    (tmp_path / "exp.yaml").write_text("data: {}\n")
    assert source_kind(tmp_path / "exp.yaml") == "dataset"
    assert source_kind(tmp_path / "bag" / "..") == "dataset"  # a folder without pictures: a KITTI-layout root
    with pytest.raises(UserError, match="does not exist"):
        source_kind(tmp_path / "missing")
    with pytest.raises(UserError, match="not an image, a rosbag or a config YAML"):
        source_kind(tmp_path / "notes.txt")


def viz(source: Path, out: Path, model: Path | None = None, **overrides) -> list[Path]:
    """`run_viz` as `distill viz` calls it, drawing every point (stride 1) unless told otherwise."""
    return run_viz(source, **{"model": model, "out": out, "image_topic": IMAGE_TOPIC, "points_stride": 1, **overrides})


def write_depth_bag(path: Path, depth: np.ndarray, rgb: np.ndarray, K: np.ndarray) -> None:
    """A rosbag2 (mcap) like depth_node_bag's output: /depth 32FC1, /depth/camera_info, the camera image."""
    store = get_typestore(Stores.ROS2_HUMBLE)
    t = store.types
    height, width = depth.shape
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=7, nanosec=5), frame_id="cam")
    roi = t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    P = np.concatenate([K, np.zeros((3, 1))], axis=1)
    info = t["sensor_msgs/msg/CameraInfo"](header=header, height=height, width=width, distortion_model="plumb_bob",
                                           d=np.zeros(5), k=K.ravel(), r=np.eye(3).ravel(), p=P.ravel(), binning_x=0,
                                           binning_y=0, roi=roi)  # fmt: skip
    depth_bytes = depth.view(np.uint8).ravel()
    depth_msg = t["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="32FC1",
                                           is_bigendian=0, step=4 * width, data=depth_bytes)  # fmt: skip
    image = t["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="rgb8", is_bigendian=0,
                                       step=3 * width, data=rgb.ravel())  # fmt: skip
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic, msgtype, message in (("/depth/camera_info", "sensor_msgs/msg/CameraInfo", info),
                                        (IMAGE_TOPIC, "sensor_msgs/msg/Image", image),
                                        ("/depth", "sensor_msgs/msg/Image", depth_msg)):  # fmt: skip
            connection = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(connection, 7 * 10**9 + 5, store.serialize_cdr(message, msgtype))


def test_viz_bag_depth_topic_to_pngs_ply_and_preview(tmp_path):
    depth = np.full((12, 16), 8.0, np.float32)
    depth[0, :4] = [np.nan, np.inf, -np.inf, 0.0]  # REP 117 states and zero: invalid
    rgb = np.zeros((12, 16, 3), np.uint8)
    rgb[..., 1] = 200
    K = np.array([[20.0, 0, 7.5], [0, 20.0, 5.5], [0, 0, 1]])
    write_depth_bag(tmp_path / "bag", depth, rgb, K)
    written = viz(tmp_path / "bag", tmp_path / "out")
    names = sorted(path.name for path in written)
    assert names == [f"7_000000005_{suffix}" for suffix in ("depth.png", "panel.png", "points.ply", "points.png")]
    picture = cv2.imread(str(tmp_path / "out" / "7_000000005_depth.png"))
    assert picture.shape == (12, 16, 3)
    assert not picture[0, :4].any() and picture[1:].any(axis=2).all()
    header, vertices = read_ply(tmp_path / "out" / "7_000000005_points.ply")
    assert len(vertices) == depth.size - 4  # the invalid pixels are not points
    np.testing.assert_allclose(vertices["z"], 8.0)
    np.testing.assert_allclose(vertices["x"][0], (4 - 7.5) * 8 / 20)  # first valid pixel (row 0, column 4)
    assert (vertices["green"] == 200).all()  # coloured by the image of the same stamp
    with pytest.raises(UserError, match="depth_node_bag"):
        viz(tmp_path / "bag", tmp_path / "o2", model=tmp_path / "m.onnx")
    with pytest.raises(UserError, match="no /depth_missing"):
        viz(tmp_path / "bag", tmp_path / "o3", depth_topic="/depth_missing")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """A random-init exported student (64x96): real ONNX Runtime inference through depth_node.engine."""
    from distill.models import build_student
    from distill.verbs.export import export_onnx

    model = build_student("mobilenetv2_100", decoder_width=16, bins=16).eval()
    path, _ = export_onnx(model, tmp_path_factory.mktemp("onnx"), (64, 96), False, 17, {})
    return path


@pytest.mark.slow
def test_viz_images_with_an_onnx_model(tmp_path, tiny_onnx):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        cv2.imwrite(str(folder / f"frame{index}.jpg"), np.full((40, 60, 3), 60 * index, np.uint8))
    written = viz(folder, tmp_path / "out", tiny_onnx, max_frames=2, points_stride=2)
    assert len(written) == 2 * 4  # two frames (--max-frames), depth/ply/preview/panel each
    depth = cv2.imread(str(tmp_path / "out" / "frame0_depth.png"))
    assert depth.shape == (40, 60, 3) and depth.any(axis=2).all()  # a metric model predicts every pixel
    _, vertices = read_ply(tmp_path / "out" / "frame1_points.ply")
    assert len(vertices) == 20 * 30 and (vertices["red"] == 60).all()
    with pytest.raises(UserError, match="--model is needed"):
        viz(folder, tmp_path / "o2")
    single = viz(folder / "frame2.jpg", tmp_path / "o3", tiny_onnx)
    assert [path.name for path in single][0] == "frame2_depth.png" and len(single) == 4


@pytest.mark.slow
def test_viz_dataset_on_the_real_kitti_frame_writes_error_maps(tmp_path, tiny_onnx, shared_data):
    kitti = shared_data / "kitti_raw_sample"
    config = tmp_path / "kitti.yaml"
    config.write_text(f"data:\n  kind: kitti\n  root: {kitti}\n  raw_root: {kitti}\n"
                      f"  gt_root: {kitti / 'data_depth_annotated'}\n")  # fmt: skip
    written = viz(config, tmp_path / "out", tiny_onnx, points_stride=4)
    name = "2011_09_26_drive_0001_sync_image_02_0000000005"
    assert {path.name for path in written} == {f"{name}_{s}" for s in
                                               ("depth.png", "gt.png", "error.png", "points.ply", "points.png",
                                                "panel.png")}  # fmt: skip
    error = cv2.imread(str(tmp_path / "out" / f"{name}_error.png"))
    gt = cv2.imread(str(tmp_path / "out" / f"{name}_gt.png"), cv2.IMREAD_UNCHANGED)
    assert error.shape == (375, 1242, 3) and gt.shape == (375, 1242, 3)
    assert not error[:100].any() and error[300:].any()  # KITTI's annotations cover the lower part only
    panel = cv2.imread(str(tmp_path / "out" / f"{name}_panel.png"))
    assert panel.shape == (4 * (375 + 18) + 3 * 4, 1242, 3)
