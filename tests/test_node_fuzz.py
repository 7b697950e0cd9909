"""The depth node under random input (hypothesis): Image, CompressedImage, CameraInfo and PointCloud2 field values
(encodings, sizes, steps, truncated data, NaN/Inf/zero intrinsics, empty and malformed clouds, stamps out of order).

Most examples go through a live DepthNode's handlers synchronously (`stream.on_camera_info`, `stream.on_scan`,
`handle_frame`); a few are published on real topics. The contract (shared/docs/ros.md, "Failure behaviour"): no
exception escapes; each bad message is counted once in the node's counters and warned about on /rosout, throttled
per kind; nothing fails inside processing (`failed` stays 0: the catch-all is a safety net, not a path); and the
next valid frame is processed correctly, its depth being the closed-form output of the ramp model
(red/255 + 1 m, or the LiDAR truth when aligned).
"""

from __future__ import annotations

import itertools
import time

import cv2
import numpy as np
import pytest
import rclpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_fixtures import (
    Probe,
    camera_info_msg,
    cloud_msg,
    depth_array,
    image_msg,
    make_header,
    ramp_image,
    ramp_model,
    spin_until,
    surface_scan,
)
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField

from depth_node.log_throttle import WARN_PERIOD_S, Throttle
from depth_node.node import DepthNode

pytestmark = pytest.mark.ros

HEIGHT, WIDTH = 24, 32
K = np.array([[30.0, 0.0, 15.5], [0.0, 30.0, 11.5], [0.0, 0.0, 1.0]])
T_CAM_LIDAR = np.array([[0, -1, 0, 0.05], [0, 0, -1, -0.08], [1, 0, 0, -0.27], [0, 0, 0, 1]], dtype=np.float64)
FUZZ_S = 10**6  # fuzzed stamps lie in [0, FUZZ_S) s; valid frames are stamped after it, so the two never pair
VALID_STAMPS = itertools.count(2 * FUZZ_S * 10**9, 10**9)
SETTINGS = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
# Bytes per pixel of the camera encodings the fuzzer builds layouts for.
CAMERA_ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2, "16UC1": 2, "rgb16": 6,
                    "bayer_rggb8": 1, "yuv422": 2}  # fmt: skip


def parameters(model, **values) -> list[Parameter]:
    values = {"model": str(model), "lazy": False, "diagnostics_period": 0.5} | values
    return [Parameter(name, value=value) for name, value in values.items()]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """camera: a DepthNode called directly; lidar: the same with LiDAR alignment (no smoothing); graph: one on the
    probe's executor in namespace fuzz_graph, reached only through topics; probe: publishes there, hears /rosout."""
    model = ramp_model(tmp_path_factory.mktemp("fuzz") / "ramp.onnx", size=(HEIGHT, WIDTH))
    context = rclpy.Context()
    rclpy.init(context=context)
    lidar = {"use_lidar": True, "lidar_to_camera": T_CAM_LIDAR.ravel().tolist(), "lidar_max_dt": 0.02,
             "alignment_momentum": 0.0}  # fmt: skip
    made = {
        "camera": DepthNode(context=context, namespace="fuzz_camera", parameter_overrides=parameters(model)),
        "lidar": DepthNode(context=context, namespace="fuzz_lidar", parameter_overrides=parameters(model, **lidar)),
        "graph": DepthNode(
            context=context, namespace="fuzz_graph", parameter_overrides=parameters(model, sub_reliability="reliable")
        ),
    }
    made["probe"] = Probe(context, extra_nodes=[made["graph"]], namespace="fuzz_graph")
    yield made
    made.pop("probe").close()
    for node in made.values():
        node.destroy_node()
    context.try_shutdown()


# --- strategies: each draws a message and whether it is bad (None: either, only the invariants are checked) --------
def headers() -> st.SearchStrategy:
    return st.builds(lambda ns: make_header(ns, "camera_optical"), st.integers(0, FUZZ_S * 10**9 - 1))


@st.composite
def raw_images(draw) -> tuple[Image, bool | None]:
    """A camera Image with one named defect or none, every other field random; or every field random (bad: None)."""
    defect = draw(st.sampled_from(["none", "encoding", "measurement", "zero size", "step", "truncated", "odd yuv",
                                   "random"]))  # fmt: skip
    encoding = "yuv422" if defect == "odd yuv" else draw(st.sampled_from(sorted(CAMERA_ENCODINGS)))
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    if encoding == "yuv422":  # two pixels share their chroma: an even width, unless that is the defect
        width = 2 * width + (defect == "odd yuv")
    step = width * CAMERA_ENCODINGS[encoding] + draw(st.integers(0, 5))
    size = step * height + draw(st.integers(0, 7))  # row padding and trailing bytes are legal
    if defect == "encoding":
        encoding = draw(st.sampled_from(["", "RGB8", "rgb8 ", "xyz16", "jpeg", "8UC4", "bayer_rggb16", "nv12"]))
    elif defect == "measurement":
        encoding = draw(st.sampled_from(["32FC1", "16SC1"]))
    elif defect == "zero size":
        height, width = draw(st.sampled_from([(0, width), (height, 0), (0, 0)]))
    elif defect == "step":
        step = draw(st.integers(0, width * CAMERA_ENCODINGS[encoding] - 1))
        size = step * height
    elif defect == "truncated":
        size = draw(st.integers(0, step * height - 1))
    elif defect == "random":
        encoding = draw(st.sampled_from([*CAMERA_ENCODINGS, "yuv422_yuy2", "bgra16", "8UC3", "16SC1", "32FC1", "x"]))
        height, width, step, size = (draw(st.integers(0, n)) for n in (20, 20, 130, 600))
    msg = Image(header=draw(headers()), height=height, width=width, encoding=encoding, step=step)
    msg.is_bigendian = draw(st.integers(0, 1))
    msg.data = draw(st.binary(min_size=size, max_size=size))
    return msg, {"none": False, "random": None}.get(defect, True)


@st.composite
def compressed_images(draw) -> tuple[CompressedImage, bool | None]:
    """A CompressedImage: a real PNG/JPEG, or empty, random, truncated, or a compressedDepth one."""
    defect = draw(st.sampled_from(["none", "empty", "random", "truncated", "compressedDepth"]))
    height, width = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    pixels = np.frombuffer(draw(st.binary(min_size=height * width * 3, max_size=height * width * 3)), np.uint8)
    extension = draw(st.sampled_from([".png", ".jpg"]))
    encoded = cv2.imencode(extension, pixels.reshape(height, width, 3))[1].tobytes()
    fmt = draw(st.sampled_from(["png", "jpeg", "rgb8; jpeg compressed bgr8", "bgr8; png compressed rgb8", "", "?"]))
    if defect == "empty":
        encoded = b""
    elif defect == "random":
        encoded = draw(st.binary(min_size=1, max_size=256))
    elif defect == "truncated":  # libjpeg decodes a cut JPEG as far as it goes: either outcome is fine
        encoded = encoded[: draw(st.integers(0, len(encoded) - 1))]
    elif defect == "compressedDepth":
        fmt = "16UC1; compressedDepth png"
    bad = None if defect == "truncated" else defect != "none"
    return CompressedImage(header=draw(headers()), format=fmt, data=encoded), bad


@st.composite
def camera_infos(draw) -> tuple[object, bool]:
    """A CameraInfo of any size with one named defect or none (an all-zero P is legal: K is used), or with any
    numbers at all in K and P (bad: None)."""
    defect = draw(st.sampled_from(["none", "zero P", "nan", "inf", "zero focal", "negative focal", "zero size",
                                   "any numbers"]))  # fmt: skip
    width, height = draw(st.integers(1, 5000)), draw(st.integers(1, 5000))
    focal = st.floats(1e-3, 1e5)
    fx, fy, cx, cy = draw(focal), draw(focal), draw(st.floats(-1e4, 1e4)), draw(st.floats(-1e4, 1e4))
    info = camera_info_msg(np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), width, height, 0)
    info.header = draw(headers())
    k, p = np.array(info.k), np.array(info.p)
    if defect in ("nan", "inf"):
        array, index = draw(st.sampled_from([(k, i) for i in range(9)] + [(p, i) for i in range(12)]))
        array[index] = np.nan if defect == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
    elif defect in ("zero focal", "negative focal"):
        value = 0.0 if defect == "zero focal" else -draw(focal)
        index = draw(st.sampled_from([0, 4]))  # fx or fy, in K and in P
        k[index] = p[index + index // 4] = value
    elif defect == "zero P":
        p[:] = 0.0
    elif defect == "zero size":
        info.width, info.height = draw(st.sampled_from([(0, height), (width, 0), (0, 0)]))
    elif defect == "any numbers":
        k, p = (np.array(draw(st.lists(st.floats(), min_size=n, max_size=n))) for n in (9, 12))
    info.k, info.p = k.tolist(), p.tolist()
    return info, {"none": False, "zero P": False, "any numbers": None}.get(defect, True)


def scan_values(draw, count: int, finite: bool) -> np.ndarray:
    """(count, 3) float32 points: in a box around the camera, or anything at all (NaN, Inf, huge, subnormal)."""
    values = st.floats(-50, 50, width=32) if finite else st.floats(width=32)
    return np.array(draw(st.lists(values, min_size=3 * count, max_size=3 * count)), np.float32).reshape(count, 3)


@st.composite
def clouds(draw) -> tuple[PointCloud2, bool | None]:
    """A PointCloud2 (organised or not) with one named defect or none, or a random layout (bad: None)."""
    defect = draw(st.sampled_from(["none", "any values", "empty", "no x", "datatype", "offset", "row_step",
                                   "truncated", "random layout"]))  # fmt: skip
    rows, columns = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    points = scan_values(draw, rows * columns, finite=defect != "any values")
    msg = cloud_msg(points, draw(st.integers(0, FUZZ_S * 10**9 - 1)), "velodyne")
    msg.height, msg.width = rows, columns
    msg.row_step = msg.point_step * columns
    fields = list(msg.fields)
    if defect == "empty":
        msg.height, msg.width, msg.row_step, msg.data = draw(st.sampled_from([(0, 0), (1, 0), (0, 5)])) + (0, b"")
    elif defect == "no x":
        fields = fields[1:]
    elif defect == "datatype":
        fields[1] = PointField(name="y", offset=4, datatype=draw(st.sampled_from([0, 9, 255])), count=1)
    elif defect == "offset":
        fields[2] = PointField(name="z", offset=draw(st.integers(msg.point_step - 3, 64)), datatype=7, count=1)
    elif defect == "row_step":
        msg.row_step = draw(st.integers(0, msg.point_step * columns - 1))
    elif defect == "truncated":
        msg.data = bytes(msg.data)[: draw(st.integers(0, len(msg.data) - 1))]
    elif defect == "random layout":
        names = st.sampled_from(["x", "y", "z", "intensity", ""])
        field = st.builds(PointField, name=names, offset=st.integers(0, 40), datatype=st.integers(0, 10),
                          count=st.integers(0, 3))  # fmt: skip
        fields = draw(st.lists(field, max_size=5))
        msg.point_step, msg.row_step = draw(st.integers(0, 40)), draw(st.integers(0, 500))
        msg.data = draw(st.binary(max_size=600))
    msg.fields = fields
    finite = bool(np.isfinite(points).all(axis=1).any())
    bad = {"none": False, "any values": not finite, "random layout": None}.get(defect, True)
    return msg, bad


# --- helpers ---------------------------------------------------------------------------------------------------------
def feed(node: DepthNode, handler, msg) -> dict[str, int]:
    """Call a handler; the counters it changed and by how much (it must not raise)."""
    before = dict(vars(node.counters))
    handler(msg)
    return {key: value - before[key] for key, value in vars(node.counters).items() if value != before[key]}


def assert_processes_a_valid_frame(node: DepthNode) -> None:
    """A good camera_info and ramp image: the depth is red/255 + 1 m, exactly (no resize at the model size)."""
    stamp = next(VALID_STAMPS)
    node.stream.on_camera_info(camera_info_msg(K, WIDTH, HEIGHT, stamp))
    rgb = ramp_image(HEIGHT, WIDTH)
    result = node.handle_frame(image_msg(rgb, stamp))
    assert result is not None and result.depth.shape == (HEIGHT, WIDTH)
    np.testing.assert_allclose(result.depth, rgb[..., 0] / 255.0 + 1.0, atol=1e-4)


def assert_counted(delta: dict[str, int], bad: bool | None, good: dict[str, int]) -> None:
    """A bad message moved bad_input by one and nothing else, a good one `good`; either, when bad is None."""
    allowed = {True: [{"bad_input": 1}], False: [good], None: [{"bad_input": 1}, good]}[bad]
    assert delta in allowed, delta


def assert_warned_and_throttled(probe: Probe, logger: str, text: str, started: float) -> None:
    """At least one `text` warning from `logger` on /rosout, and no more than the throttle allows per kind."""
    spin_until(lambda: probe.warnings(text, logger), timeout=10)
    kinds = 3  # per node here: image, camera_info; or malformed scan, empty scan, alignment
    windows = (time.monotonic() - started) / WARN_PERIOD_S + 1
    assert len(probe.warnings("", logger)) <= kinds * windows + 1


# --- direct calls ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_random_images_and_camera_infos_are_counted_warned_and_followed_by_a_good_frame(nodes):
    node, probe, started = nodes["camera"], nodes["probe"], time.monotonic()

    @settings(max_examples=400, **SETTINGS)
    @given(st.lists(st.one_of(raw_images(), compressed_images(), camera_infos()), min_size=1, max_size=3))
    def run(messages):
        node.stream.on_camera_info(camera_info_msg(K, WIDTH, HEIGHT, 0))
        for msg, bad in messages:
            if isinstance(msg, Image | CompressedImage):
                assert_counted(feed(node, node.handle_frame, msg), bad, good={"frames_out": 1})
            else:  # the camera_info is checked with the next frame, which it makes bad
                assert feed(node, node.stream.on_camera_info, msg) == {}
                assert_counted(feed(node, node.handle_frame, image_msg(ramp_image(5, 7), 0)), bad, {"frames_out": 1})
                node.stream.on_camera_info(camera_info_msg(K, WIDTH, HEIGHT, 0))
        assert_processes_a_valid_frame(node)

    run()
    assert node.counters.failed == 0
    assert_warned_and_throttled(probe, "fuzz_camera.depth_node", "frame skipped: ", started)


@pytest.mark.slow
def test_random_clouds_are_counted_and_never_break_the_alignment(nodes):
    node, probe, started = nodes["lidar"], nodes["probe"], time.monotonic()
    rgb = ramp_image(HEIGHT, WIDTH)
    truth = 2.5 * (rgb[..., 0] / 255.0 + 1.0) + 0.3  # a mis-scaled metric model: truth = 2.5 * model + 0.3 m
    scan = surface_scan(truth, K, T_CAM_LIDAR)

    @settings(max_examples=300, **SETTINGS)
    @given(clouds())
    def run(drawn):
        cloud, bad = drawn
        assert_counted(feed(node, node.stream.on_scan, cloud), bad, good={})
        # a frame at the cloud's stamp pairs with it: the alignment runs on whatever the cloud held
        stamp = cloud.header.stamp.sec * 10**9 + cloud.header.stamp.nanosec
        node.stream.on_camera_info(camera_info_msg(K, WIDTH, HEIGHT, stamp))
        assert feed(node, node.handle_frame, image_msg(rgb, stamp)) == {"frames_out": 1}
        assert node.stream.last_result.depth.shape == (HEIGHT, WIDTH)
        stamp = next(VALID_STAMPS)  # then a good scan and frame: aligned to the truth again
        node.stream.on_scan(cloud_msg(scan, stamp + 5_000_000, "velodyne"))
        result = node.handle_frame(image_msg(rgb, stamp))
        assert result.alignment.ok and not result.alignment.from_prior
        np.testing.assert_allclose(result.depth, truth, rtol=0.01)

    node.stream.on_camera_info(camera_info_msg(K, WIDTH, HEIGHT, 0))
    run()
    assert node.counters.failed == 0
    assert_warned_and_throttled(probe, "fuzz_lidar.depth_node", "LiDAR scan skipped: ", started)


def test_a_flood_of_one_kind_logs_once_per_period_and_counts_what_it_held_back():
    now = [100.0]
    throttle = Throttle(period=2.0, clock=lambda: now[0])
    assert throttle("image", "frame skipped: a") == "frame skipped: a"
    for _ in range(20):
        now[0] += 0.09  # 20 more within 1.8 s: all held back
        assert throttle("image", "frame skipped: held") is None
    assert throttle("lidar", "scan skipped") == "scan skipped"  # another kind has its own budget
    now[0] = 101.99
    assert throttle("image", "frame skipped: still held") is None
    now[0] = 102.5
    assert throttle("image", "frame skipped: last") == "frame skipped: last (+21 similar in the last 2.5 s)"
    now[0] = 103.0
    assert throttle("image", "frame skipped: again") is None  # the period restarts at the line logged
    now[0] = 104.5
    assert throttle("image", "frame skipped: new") == "frame skipped: new (+1 similar in the last 2.0 s)"


# --- real topics -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_random_bad_messages_on_real_topics_are_counted_and_the_next_frame_comes_out(nodes):
    node, probe = nodes["graph"], nodes["probe"]
    rgb = ramp_image(HEIGHT, WIDTH)

    def deliver_camera_info(info=None) -> None:
        """Publish a camera_info (default: the good one) under a new stamp until the node holds it."""
        info = info or camera_info_msg(K, WIDTH, HEIGHT, 0)
        info.header.stamp = make_header(next(VALID_STAMPS), "camera_optical").stamp
        held = lambda: node.stream.camera_info is not None and node.stream.camera_info.header.stamp == info.header.stamp  # noqa: E731
        spin_until(held, lambda: probe.pub_info.publish(info))

    @settings(max_examples=20, **SETTINGS)
    @given(st.one_of(raw_images(), camera_infos()).filter(lambda drawn: drawn[1] is True))
    def run(drawn):
        msg, _ = drawn
        image = msg if isinstance(msg, Image) else image_msg(rgb, next(VALID_STAMPS))
        deliver_camera_info(None if isinstance(msg, Image) else msg)
        bad_input, frames_out = node.counters.bad_input, node.counters.frames_out
        spin_until(lambda: node.counters.bad_input > bad_input, lambda: probe.pub_image.publish(image), timeout=10)
        assert node.counters.frames_out == frames_out and node.counters.failed == 0
        stamp = next(VALID_STAMPS)
        deliver_camera_info()
        spin_until(lambda: probe.get("depth", stamp), lambda: probe.pub_image.publish(image_msg(rgb, stamp)))
        np.testing.assert_allclose(depth_array(probe.get("depth", stamp)), rgb[..., 0] / 255.0 + 1.0, atol=1e-4)

    run()
    spin_until(lambda: probe.warnings("frame skipped: ", "fuzz_graph.depth_node"), timeout=10)
