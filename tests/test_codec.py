"""depth_node.image_codec and codec: Image / CompressedImage / CameraInfo <-> numpy for every encoding, with row
padding, big-endian data and malformed messages, and the output messages for rclpy and rosbags alike (the real KITTI
bag is decoded end to end in test_geometry.py)."""

from __future__ import annotations

import array
import tracemalloc
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from node_fixtures import jpeg_bomb, png_bomb

from depth_node.codec import (
    camera_info_msg,
    camera_info_to_P,
    depth_to_image_msg,
    make_header,
    scale_camera_info,
    validate_camera_info,
)
from depth_node.image_codec import (
    MAX_IMAGE_PIXELS,
    compressed_to_numpy,
    declared_size,
    image_msg_to_rgb,
    image_to_numpy,
    message_array,
    numpy_to_image_fields,
    to_rgb,
)

RNG = np.random.default_rng(0)
# encoding -> (numpy dtype, trailing shape) of the array image_to_numpy returns
WRITABLE = {
    "rgb8": (np.uint8, (3,)),
    "rgba8": (np.uint8, (3,)),
    "bgr8": (np.uint8, (3,)),
    "bgra8": (np.uint8, (3,)),
    "8UC3": (np.uint8, (3,)),
    "rgb16": (np.uint16, (3,)),
    "rgba16": (np.uint16, (3,)),
    "bgr16": (np.uint16, (3,)),
    "bgra16": (np.uint16, (3,)),
    "mono8": (np.uint8, ()),
    "8UC1": (np.uint8, ()),
    "mono16": (np.uint16, ()),
    "16UC1": (np.uint16, ()),
    "16SC1": (np.int16, ()),
    "32FC1": (np.float32, ()),
}
MULTI_BYTE = [name for name, (dtype, _) in WRITABLE.items() if np.dtype(dtype).itemsize > 1]
KITTI_K = [721.5377, 0.0, 609.5593, 0.0, 721.5377, 172.854, 0.0, 0.0, 1.0]


def _random_image(encoding: str, height: int = 5, width: int = 7) -> np.ndarray:
    dtype, channels = WRITABLE[encoding]
    shape = (height, width, *channels)
    if np.dtype(dtype).kind == "f":
        return RNG.normal(10.0, 5.0, shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _message(**fields) -> SimpleNamespace:
    """An Image as rosbags delivers it: plain fields, data as a numpy uint8 array."""
    fields["data"] = np.frombuffer(bytes(fields["data"]), dtype=np.uint8)
    return SimpleNamespace(**fields)


def _pad_rows(fields: dict, padding: int) -> dict:
    """The same image with `padding` garbage bytes after every row (step > width * bytes per pixel)."""
    rows = np.frombuffer(bytes(fields["data"]), np.uint8).reshape(fields["height"], fields["step"])
    garbage = np.full((fields["height"], padding), 0xAB, np.uint8)
    return dict(fields, step=fields["step"] + padding, data=np.concatenate([rows, garbage], axis=1).tobytes())


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("padding", [0, 3])
@pytest.mark.parametrize("encoding", list(WRITABLE))
def test_every_encoding_round_trips(encoding: str, padding: int, bigendian: bool) -> None:
    image = _random_image(encoding)
    fields = _pad_rows(numpy_to_image_fields(image, encoding, bigendian=bigendian), padding)
    decoded = image_to_numpy(_message(**fields))
    assert decoded.dtype == image.dtype and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, image)


def test_stored_byte_layout_follows_the_encoding() -> None:
    rgb = np.array([[[10, 20, 30]]], np.uint8)
    assert list(numpy_to_image_fields(rgb, "bgr8")["data"]) == [30, 20, 10]
    assert list(numpy_to_image_fields(rgb, "rgba8")["data"]) == [10, 20, 30, 255]
    assert list(numpy_to_image_fields(rgb, "bgra8")["data"]) == [30, 20, 10, 255]
    mono16 = np.array([[0x0102]], np.uint16)
    assert list(numpy_to_image_fields(mono16, "mono16")["data"]) == [0x02, 0x01]
    assert list(numpy_to_image_fields(mono16, "mono16", bigendian=True)["data"]) == [0x01, 0x02]
    fields = numpy_to_image_fields(np.zeros((2, 3), np.float32), "32FC1")
    assert (fields["step"], fields["is_bigendian"], len(fields["data"])) == (12, 0, 24)
    assert isinstance(fields["data"], array.array)


def test_an_image_already_in_a_message_buffer_is_kept_not_copied() -> None:
    buffer, depth = message_array((4, 5), np.float32)
    depth[...] = RNG.uniform(1, 80, (4, 5))
    assert numpy_to_image_fields(depth, "32FC1")["data"] is buffer
    # anything else is copied into a buffer of its own: a part of one, its transpose, another byte order
    for image, bigendian in ((depth[1:], False), (depth.T, False), (depth, True)):
        assert numpy_to_image_fields(image, "32FC1", bigendian=bigendian)["data"] is not buffer
    kept = numpy_to_image_fields(depth, "32FC1")
    np.testing.assert_array_equal(image_to_numpy(SimpleNamespace(**kept)), depth)


def test_data_as_bytes_array_or_list_of_ints_decodes_the_same() -> None:
    image = _random_image("rgb8", 2, 3)
    fields = numpy_to_image_fields(image, "rgb8")
    for data in (bytes(fields["data"]), fields["data"], list(fields["data"])):
        np.testing.assert_array_equal(image_to_numpy(SimpleNamespace(**dict(fields, data=data))), image)


def test_rgb_and_mono_results_are_views_of_the_message_data() -> None:
    fields = numpy_to_image_fields(_random_image("rgb8"), "rgb8")
    message = SimpleNamespace(**fields)
    decoded = image_to_numpy(message)
    assert np.shares_memory(decoded, np.frombuffer(message.data, np.uint8))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"encoding": "hsv8"}, "unsupported image encoding 'hsv8'"),
        ({"height": 0}, "zero-size"),
        ({"width": 0}, "zero-size"),
        ({"step": 3 * 7 - 1}, "step 20 < width 7"),
        ({"data": bytes(3 * 7 * 5 - 1)}, "truncated"),
        ({"data": b""}, "truncated"),
    ],
)
def test_malformed_images_raise_value_error(change: dict, match: str) -> None:
    fields = dict(numpy_to_image_fields(_random_image("rgb8"), "rgb8"), **change)
    with pytest.raises(ValueError, match=match):
        image_to_numpy(_message(**fields))


def test_input_only_encodings_and_wrong_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="input-only"):
        numpy_to_image_fields(np.zeros((2, 2), np.uint8), "bayer_rggb8")
    with pytest.raises(ValueError, match="cannot store a float64 array as mono8"):
        numpy_to_image_fields(np.zeros((2, 2)), "mono8")
    with pytest.raises(ValueError, match=r"needs an \(H, W, 3\)"):
        numpy_to_image_fields(np.zeros((2, 2), np.uint8), "rgb8")


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_demosaics_to_the_right_colour(pattern: str) -> None:
    colour = {"r": 200, "g": 120, "b": 40}
    raw = np.empty((8, 10), np.uint8)
    for (row, column), letter in zip([(0, 0), (0, 1), (1, 0), (1, 1)], pattern):
        raw[row::2, column::2] = colour[letter]
    message = _message(height=8, width=10, encoding=f"bayer_{pattern}8", is_bigendian=0, step=10, data=raw.tobytes())
    rgb = image_to_numpy(message)
    assert rgb.shape == (8, 10, 3)
    np.testing.assert_allclose(rgb[2:-2, 2:-2], np.broadcast_to([200, 120, 40], (4, 6, 3)), atol=1)


@pytest.mark.parametrize(
    ("encoding", "code"),
    [("yuv422", cv2.COLOR_RGB2YUV_UYVY), ("uyvy", cv2.COLOR_RGB2YUV_UYVY), ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUY2)],
)
def test_yuv422_decodes_to_rgb(encoding: str, code: int) -> None:
    rgb = np.broadcast_to(np.array([200, 120, 40], np.uint8), (4, 6, 3)).copy()
    packed = cv2.cvtColor(rgb, code)
    fields = {"height": 4, "width": 6, "encoding": encoding, "is_bigendian": 0, "step": 12, "data": packed.tobytes()}
    np.testing.assert_allclose(image_to_numpy(_message(**_pad_rows(fields, 4))).astype(int), rgb, atol=3)
    with pytest.raises(ValueError, match="even width"):
        image_to_numpy(_message(**dict(fields, width=5)))


def test_to_rgb_gives_uint8_rgb_for_every_camera_encoding() -> None:
    mono = _random_image("mono8")
    np.testing.assert_array_equal(to_rgb(_message(**numpy_to_image_fields(mono, "mono8"))), np.dstack([mono] * 3))
    mono16 = _random_image("16UC1")
    expected = np.dstack([(mono16 >> 8).astype(np.uint8)] * 3)
    np.testing.assert_array_equal(to_rgb(_message(**numpy_to_image_fields(mono16, "16UC1", bigendian=True))), expected)
    rgb16 = _random_image("bgr16")
    np.testing.assert_array_equal(to_rgb(_message(**numpy_to_image_fields(rgb16, "bgr16"))), rgb16 >> 8)
    rgb = _random_image("bgra8")
    result = to_rgb(_message(**numpy_to_image_fields(rgb, "bgra8")))
    assert result.dtype == np.uint8 and result.shape == (5, 7, 3)
    np.testing.assert_array_equal(result, rgb)
    with pytest.raises(ValueError, match="32FC1 holds measurements"):
        to_rgb(_message(**numpy_to_image_fields(np.ones((2, 2), np.float32), "32FC1")))


def _compressed(image: np.ndarray, extension: str, fmt: str) -> SimpleNamespace:
    ok, encoded = cv2.imencode(extension, image)
    assert ok
    return SimpleNamespace(format=fmt, data=encoded.tobytes())


def test_compressed_png_and_jpeg_decode_to_rgb() -> None:
    gradient = np.linspace(0, 255, 32 * 48).reshape(32, 48).astype(np.uint8)
    rgb = np.dstack([gradient, gradient[::-1], np.full_like(gradient, 90)])
    bgr = rgb[..., ::-1]
    np.testing.assert_array_equal(compressed_to_numpy(_compressed(bgr, ".png", "rgb8; png compressed bgr8")), rgb)
    jpeg = compressed_to_numpy(_compressed(bgr, ".jpg", "jpeg"))
    assert jpeg.shape == rgb.shape and np.abs(jpeg.astype(int) - rgb).mean() < 3
    # Publishers that write RGB bytes straight into the file say so after "compressed".
    np.testing.assert_array_equal(compressed_to_numpy(_compressed(rgb, ".png", "rgb8; png compressed rgb8")), rgb)
    mono = compressed_to_numpy(_compressed(gradient, ".png", "mono8; png compressed mono8"))
    np.testing.assert_array_equal(mono, np.dstack([gradient] * 3))


@pytest.mark.parametrize(
    ("fmt", "data", "match"),
    [
        ("jpeg", b"", "no data"),
        ("jpeg", b"\xff\xd8 definitely not a jpeg", "could not decode"),
        ("png", bytes(range(256)), "could not decode"),
        ("16UC1; compressedDepth png", b"\x00" * 64, "compressedDepth"),
    ],
)
def test_undecodable_compressed_images_raise_value_error(fmt: str, data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compressed_to_numpy(SimpleNamespace(format=fmt, data=data))


def test_declared_size_reads_png_and_jpeg_headers_without_decoding() -> None:
    image = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for extension in (".png", ".jpg"):
        assert declared_size(cv2.imencode(extension, image)[1]) == (53, 37), extension
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    # an EXIF segment (with a 0xFFC0 inside it) and fill bytes before the frame header are skipped
    exif = b"\xff\xe1" + (2 + 10).to_bytes(2, "big") + b"Exif\x00\x00\xff\xc0\x00\x11"
    padded = jpeg[:2] + exif + b"\xff" + jpeg[2:]
    assert declared_size(np.frombuffer(padded, np.uint8)) == (53, 37)
    assert cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR).shape == (37, 53, 3)
    for data in (b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", jpeg[:20], b"GIF89a" + bytes(30), png_bomb(4, 3)[:20]):
        assert declared_size(np.frombuffer(data, np.uint8)) is None, data
    assert declared_size(np.frombuffer(png_bomb(30000, 2), np.uint8)) == (30000, 2)
    assert declared_size(np.frombuffer(jpeg_bomb(8000, 8000), np.uint8)) == (8000, 8000)


def test_the_bomb_builders_make_files_that_decode() -> None:
    """The test bombs are real files: small versions decode to the size they declare."""
    assert cv2.imdecode(np.frombuffer(png_bomb(64, 48), np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)
    assert not cv2.imdecode(np.frombuffer(png_bomb(64, 48), np.uint8), cv2.IMREAD_COLOR).any()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            png_bomb(12000, 12000),
            "CompressedImage declares 12000x12000 (144.0 MP), more than max_image_pixels=40000000",
        ),
        (jpeg_bomb(8000, 8000), "CompressedImage declares 8000x8000 (64.0 MP), more than max_image_pixels=40000000"),
        (png_bomb(30000, 30000, rows=1), "CompressedImage declares 30000x30000 (900.0 MP)"),
    ],
    ids=["png 144 MP", "jpeg 64 MP", "png 900 MP"],
)
def test_decompression_bombs_are_refused_before_decoding(data: bytes, message: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as error:
            image_msg_to_rgb(SimpleNamespace(format="png", data=data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value) == message or str(error.value).startswith(message)
    assert peak < 1_000_000  # nothing the size of the declared image was allocated


def test_strings_from_the_sender_are_cut_and_escaped_in_error_messages() -> None:
    fields = numpy_to_image_fields(_random_image("rgb8"), "rgb8")
    forged = "\n[ERROR] [depth_node]: forged line " + "x" * 1_000_000
    with pytest.raises(ValueError) as error:
        image_to_numpy(_message(**(fields | {"encoding": forged})))
    message = str(error.value)
    assert message.startswith("unsupported image encoding '\\n[ERROR] [depth_node]: forged line xxxxx'... (1000035 ")
    assert "... (1000035 characters)" in message and "\n" not in message and len(message) < 600
    with pytest.raises(ValueError) as error:
        compressed_to_numpy(SimpleNamespace(format=forged, data=b"not an image"))
    assert "format '\\n[ERROR]" in str(error.value) and len(str(error.value)) < 200
    with pytest.raises(ValueError, match="^unsupported image encoding 'xyz16' "):  # short ones read as before
        image_to_numpy(_message(**(fields | {"encoding": "xyz16"})))


def test_the_pixel_limit_applies_to_raw_images_and_can_be_changed() -> None:
    rgb = _random_image("rgb8", 40, 50)
    fields = numpy_to_image_fields(rgb, "rgb8")
    assert image_msg_to_rgb(_message(**fields), max_pixels=2000).shape == (40, 50, 3)  # exactly at the limit
    with pytest.raises(ValueError, match=r"^image is 50x40 \(0.0 MP\), more than max_image_pixels=1999$"):
        image_msg_to_rgb(_message(**fields), max_pixels=1999)
    # a raw header declaring 8K+ is refused by its size, before its (missing) data is looked at
    huge = _message(**(fields | {"width": 9000, "height": 9000, "step": 27000}))
    with pytest.raises(ValueError, match=r"^image is 9000x9000 \(81.0 MP\), more than max_image_pixels=40000000$"):
        to_rgb(huge)
    png = cv2.imencode(".png", rgb)[1].tobytes()
    with pytest.raises(ValueError, match="CompressedImage declares 50x40"):
        compressed_to_numpy(SimpleNamespace(format="png", data=png), max_pixels=1999)
    assert MAX_IMAGE_PIXELS >= 8192 * 4320  # 8K cameras pass


def _camera_info(**changes):
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo(width=1242, height=376, distortion_model="plumb_bob", d=[0.0] * 5)
    info.k = np.array(KITTI_K)
    info.p = np.array([721.5377, 0.0, 609.5593, 44.85728, 0.0, 721.5377, 172.854, 0.2163791, 0.0, 0.0, 1.0, 0.00274])
    for name, value in changes.items():
        setattr(info, name, value)
    return info


@pytest.mark.ros
def test_scale_camera_info_halves_with_the_half_pixel_convention() -> None:
    info = _camera_info()
    half = scale_camera_info(info, 621, 188)
    assert type(half) is type(info) and (half.width, half.height) == (621, 188)
    k = half.k.reshape(3, 3)
    np.testing.assert_allclose([k[0, 0], k[1, 1]], [721.5377 / 2, 721.5377 / 2])
    np.testing.assert_allclose([k[0, 2], k[1, 2]], [(609.5593 + 0.5) / 2 - 0.5, (172.854 + 0.5) / 2 - 0.5])
    p = camera_info_to_P(half)
    np.testing.assert_allclose(p[:, :3], k)  # P stays consistent with K
    # Tx' = Tx * sx when P[2, 3] = 0 (as CameraInfo defines P); KITTI's P_rect_02 has Tz = 0.00274, which adds
    # 0.5 * (sx - 1) * Tz so that the projection stays exact.
    np.testing.assert_allclose(p[:, 3], [44.85728 / 2 - 0.25 * 0.00274, 0.2163791 / 2 - 0.25 * 0.00274, 0.00274])
    # Any 3D point lands where the source pixel maps under u' = (u + 0.5) / 2 - 0.5.
    point = np.array([3.0, -1.0, 12.0, 1.0])
    u, v, w = camera_info_to_P(info) @ point
    u2, v2, w2 = p @ point
    np.testing.assert_allclose([u2 / w2, v2 / w2], [(u / w + 0.5) / 2 - 0.5, (v / w + 0.5) / 2 - 0.5])
    np.testing.assert_allclose(info.k, KITTI_K)  # the original is untouched
    assert half.d.tolist() == [0.0] * 5 and half.distortion_model == "plumb_bob"


@pytest.mark.ros
def test_camera_info_with_zero_p_falls_back_to_k() -> None:
    info = _camera_info(p=np.zeros(12))
    np.testing.assert_allclose(camera_info_to_P(info), np.hstack([np.reshape(KITTI_K, (3, 3)), np.zeros((3, 1))]))
    np.testing.assert_allclose(camera_info_to_P(scale_camera_info(info, 2484, 752))[0, 0], 2 * 721.5377)


@pytest.mark.ros
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"width": 0}, "zero size"),
        ({"k": np.array([np.nan, *KITTI_K[1:]]), "p": np.zeros(12)}, "NaN"),
        ({"p": np.array([np.inf, *[0.0] * 10, 1.0])}, "NaN/Inf"),
        ({"k": np.zeros(9), "p": np.zeros(12)}, "focal lengths must be positive"),
        ({"p": np.array([-700.0, 0, 600, 0, 0, 700, 170, 0, 0, 0, 1, 0])}, "fx=-700"),
    ],
)
def test_bad_camera_info_raises_value_error(changes: dict, match: str) -> None:
    validate_camera_info(_camera_info())
    with pytest.raises(ValueError, match=match):
        validate_camera_info(_camera_info(**changes))
    with pytest.raises(ValueError, match=match):
        scale_camera_info(_camera_info(**changes), 100, 50)


@pytest.mark.ros
def test_camera_info_msg_is_the_same_for_rclpy_and_rosbags_and_independent_of_its_source() -> None:
    from rosbags.typesys import Stores, get_typestore
    from sensor_msgs.msg import CameraInfo

    from depth_node.codec import ROS_TYPES

    info = _camera_info(binning_x=2)
    info.roi.do_rectify, info.roi.width = True, 600
    store = get_typestore(Stores.ROS2_HUMBLE)
    live = camera_info_msg(make_header(ROS_TYPES, 1_317_042_146_466_599_772, "camera"), info)
    recorded = camera_info_msg(make_header(store.types, 1_317_042_146_466_599_772, "camera"), info, store.types)
    assert isinstance(live, CameraInfo) and type(recorded).__name__ == "sensor_msgs__msg__CameraInfo"
    for message in (live, recorded):
        assert (message.header.stamp.sec, message.header.stamp.nanosec) == (1_317_042_146, 466_599_772)
        assert (message.width, message.height, message.binning_x, message.roi.width) == (1242, 376, 2, 600)
        assert (
            message.header.frame_id == "camera" and message.roi.do_rectify and message.distortion_model == "plumb_bob"
        )
        np.testing.assert_array_equal(message.p, info.p)
    live.k[0] = 1.0
    assert info.k[0] == KITTI_K[0]  # a copy, not a view of the source
    # the rosbags message serialises (every field set, right types)
    assert (
        store.deserialize_cdr(store.serialize_cdr(recorded, recorded.__msgtype__), recorded.__msgtype__).width == 1242
    )


@pytest.mark.ros
def test_depth_to_image_msg_is_32fc1_metres_with_the_given_header() -> None:
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    depth = RNG.uniform(0.5, 80.0, (6, 9)).astype(np.float32)
    depth[0, 0], depth[1, 1], depth[2, 2] = np.nan, np.inf, -np.inf
    header = Header(frame_id="camera_color_left")
    header.stamp.sec, header.stamp.nanosec = 1317042146, 466599772
    message = depth_to_image_msg(depth, header)
    assert isinstance(message, Image) and message.header == header
    assert (message.encoding, message.step, message.is_bigendian, message.height, message.width) == (
        "32FC1",
        36,
        0,
        6,
        9,
    )
    np.testing.assert_array_equal(image_to_numpy(message), depth)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        depth_to_image_msg(depth[None], header)


@pytest.mark.ros
def test_real_messages_round_trip_through_sensor_msgs() -> None:
    from sensor_msgs.msg import Image

    for encoding in ("rgb8", "bgra8", "mono16", "32FC1"):
        image = _random_image(encoding)
        message = Image(**numpy_to_image_fields(image, encoding, bigendian=encoding == "mono16"))
        np.testing.assert_array_equal(image_to_numpy(message), image)
