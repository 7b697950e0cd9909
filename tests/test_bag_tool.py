"""`depth_node_bag` on the real KITTI rosbag2 sample (mcap), its sqlite3 and ROS 1 conversions, compressed input,
LiDAR alignment (parameter extrinsic and /tf_static), and its user errors. Output bags are read back with rosbags.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from node_fixtures import (
    KITTI_BAG,
    KITTI_CAMERA,
    assert_cloud_is_backprojection,
    camera_info_msg,
    depth_array,
    exported_student,
    png_bomb,
    ramp_image,
    ramp_model,
    surface_scan,
)
from rosbags.convert import convert
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from depth_node.bag import main
from depth_node.codec import transform_to_matrix
from depth_node.params import load_params_file, transform_matrix

REPO = Path(__file__).resolve().parents[1]
KITTI_YAML = REPO / "config" / "kitti.yaml"
IMAGE_TOPIC = f"{KITTI_CAMERA}/image_raw"
ORIGINAL_TOPICS = {
    IMAGE_TOPIC,
    f"{IMAGE_TOPIC}/compressed",
    f"{KITTI_CAMERA}/camera_info",
    f"{KITTI_CAMERA}/depth_gt",
    "/kitti/velo/pointcloud",
    "/tf_static",
}


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return exported_student(tmp_path_factory)


@pytest.fixture(scope="module")
def kitti_bag(shared_data) -> Path:
    return shared_data / KITTI_BAG


def read_bag(path: Path) -> dict[str, tuple[str, object, bytes]]:
    """topic -> (msgtype, message, raw CDR bytes) of the last message on each topic."""
    with AnyReader([path]) as reader:
        return {c.topic: (c.msgtype, reader.deserialize(raw, c.msgtype), bytes(raw)) for c, _, raw in reader.messages()}


def run_tool(in_bag: Path, out_bag: Path, model: Path, *extra: str) -> int:
    return main([str(in_bag), str(out_bag), "--model", str(model), "--params-file", str(KITTI_YAML), *extra])


@pytest.fixture(scope="module")
def kitti_output(student, kitti_bag, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bag") / "kitti_depth"
    assert run_tool(kitti_bag, out, student) == 0
    return out


@pytest.mark.slow
def test_kitti_bag_gets_depth_and_points_next_to_its_original_topics(kitti_output, kitti_bag, capsys):
    before, after = read_bag(kitti_bag), read_bag(kitti_output)
    assert set(after) == ORIGINAL_TOPICS | {"/depth", "/depth/camera_info", "/points", "/depth/confidence"}
    for topic in ORIGINAL_TOPICS:  # copied byte for byte
        assert after[topic][0] == before[topic][0] and after[topic][2] == before[topic][2], topic
    image = before[IMAGE_TOPIC][1]
    depth, info, points = (after[t][1] for t in ("/depth", "/depth/camera_info", "/points"))
    for msg in (depth, info, points):
        assert msg.header.stamp == image.header.stamp and msg.header.frame_id == "camera_color_left"
    assert (depth.encoding, depth.height, depth.width) == ("32FC1", 375, 1242)
    assert (info.width, info.height) == (1242, 375)
    np.testing.assert_array_equal(info.k, before[f"{KITTI_CAMERA}/camera_info"][1].k)
    assert (points.height, points.width, points.point_step) == (375, 1242, 12)
    assert assert_cloud_is_backprojection(depth, info, points) > 0
    values = depth_array(depth)
    assert not np.isnan(values).any() and (values[np.isfinite(values)] <= 80).all()  # kitti.yaml: max_depth 80


@pytest.mark.slow
def test_compressed_input_gives_the_same_depth(student, kitti_bag, kitti_output, tmp_path):
    out = tmp_path / "compressed"
    assert run_tool(kitti_bag, out, student, "-p", "image_transport:=compressed") == 0
    # the compressed topic holds the original lossless PNG: same pixels, same depth
    np.testing.assert_array_equal(
        depth_array(read_bag(out)["/depth"][1]), depth_array(read_bag(kitti_output)["/depth"][1])
    )


@pytest.mark.slow
def test_lidar_alignment_offline_with_the_param_extrinsic_and_with_tf_static(student, kitti_bag, tmp_path, capsys):
    by_param, by_tf = tmp_path / "param", tmp_path / "tf"
    assert run_tool(kitti_bag, by_param, student, "-p", "use_lidar:=true") == 0
    assert "1/1 frames aligned to LiDAR" in capsys.readouterr().out
    assert run_tool(kitti_bag, by_tf, student, "-p", "use_lidar:=true", "-p", "use_tf:=true") == 0
    out = read_bag(by_param)
    assert {"/depth", "/depth/mono", "/points"} <= set(out) and "/depth/relative" not in out
    aligned, mono = depth_array(out["/depth"][1]), depth_array(out["/depth/mono"][1])
    truth = depth_array(out[f"{KITTI_CAMERA}/depth_gt"][1])
    valid = np.isfinite(truth) & np.isfinite(aligned) & np.isfinite(mono)
    error = {
        name: np.median(np.abs(d[valid] - truth[valid]) / truth[valid]) for name, d in (("a", aligned), ("m", mono))
    }
    assert error["a"] < error["m"], error  # a random student is far off; the LiDAR fit brings it nearer
    # kitti.yaml's lidar_to_camera and the bag's /tf_static project the scan identically
    np.testing.assert_allclose(depth_array(read_bag(by_tf)["/depth"][1]), aligned, rtol=1e-3, atol=0.01)


def test_kitti_yaml_extrinsic_is_the_inverse_of_the_bags_tf_static(kitti_bag):
    transform = read_bag(kitti_bag)["/tf_static"][1].transforms[0]
    assert (transform.header.frame_id, transform.child_frame_id) == ("velo_link", "camera_color_left")
    lidar_to_camera = transform_matrix(load_params_file(KITTI_YAML)["lidar_to_camera"], "lidar_to_camera")
    np.testing.assert_allclose(lidar_to_camera, np.linalg.inv(transform_to_matrix(transform.transform)), atol=1e-5)


@pytest.mark.parametrize("storage", ["sqlite3", "ros1"])
def test_sqlite3_and_ros1_bags(kitti_bag, tmp_path, storage):
    source = tmp_path / ("kitti.bag" if storage == "ros1" else "kitti_sqlite3")
    typestore = get_typestore(Stores.ROS1_NOETIC if storage == "ros1" else Stores.ROS2_HUMBLE)
    convert([kitti_bag], source, "sqlite3", 8, None, "file", None, typestore, [], [], [], [])
    out = tmp_path / "out"
    assert run_tool(source, out, ramp_model(tmp_path / "ramp.onnx"), "-p", "use_lidar:=true") == 0
    result = read_bag(out)
    assert ORIGINAL_TOPICS <= set(result) and {"/depth", "/depth/mono", "/points"} <= set(result)
    assert result[IMAGE_TOPIC][0] == "sensor_msgs/msg/Image"
    info, depth = result["/depth/camera_info"][1], result["/depth"][1]
    np.testing.assert_allclose(np.reshape(info.p, (3, 4))[0, 0], 721.5377)  # ROS 1 spells it P: read all the same
    points = result["/points"][1]
    assert (depth.height, depth.width) == (points.height, points.width) == (375, 1242)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--image-topic", "/camera/image"], "no image topic '/camera/image'; the bag has: /kitti"),
        (["-p", "max_dept:=10"], "unknown depth_node parameter 'max_dept' (did you mean 'max_depth'?)"),
        (["-p", "use_lidar:=maybe"], "parameter 'use_lidar' must be true or false, got 'maybe'"),
        (["-p", "use_lidar:=true", "--lidar-topic", "/velo"], "no lidar topic '/velo'"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(kitti_bag, tmp_path, capsys, arguments, message):
    assert run_tool(kitti_bag, tmp_path / "out", ramp_model(tmp_path / "ramp.onnx"), *arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith("depth_node_bag: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_console_script_refuses_to_overwrite_and_names_a_missing_model(student, kitti_output, kitti_bag, tmp_path):
    tool = str(Path(sys.executable).parent / "depth_node_bag")
    exists = subprocess.run(
        [tool, str(kitti_bag), str(kitti_output), "--model", str(student)], capture_output=True, text=True, timeout=120
    )
    assert exists.returncode == 2 and f"output bag {kitti_output} already exists" in exists.stderr
    missing = subprocess.run(
        [tool, str(kitti_bag), str(tmp_path / "o"), "--model", str(tmp_path / "none.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and f"model file not found: {tmp_path / 'none.onnx'}" in missing.stderr


def recorded_camera_info(store, header, K: np.ndarray, width: int, height: int):
    """A rosbags CameraInfo of a camera with intrinsics K (3, 3) and P = [K | 0]."""
    from depth_node.codec import camera_info_msg as recorded

    return recorded(header, camera_info_msg(K, width, height, 0), store.types)


def write_ramp_bag(
    path: Path, frames: list[tuple[int, int, float | None]], size=(48, 64), cut: tuple[int, ...] = ()
) -> np.ndarray:
    """An mcap of ramp frames (image + camera_info), each with a scan of the true surface or none.

    Args:
        frames: per frame (header stamp ns, log time ns, scan delay s): the scan carries the image's header stamp and
            is logged `delay` seconds after it; None: no scan for this frame.
        size: (H, W) of the images (K scales with it).
        cut: numbers of the frames whose image message is cut in half (undecodable CDR).

    Returns:
        The true depth (H, W) metres, 2.5 * (red/255 + 1) + 0.3: what the ramp model outputs, mis-scaled.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    from depth_node.codec import pack_cloud

    height, width = size
    K = np.array([[60.0, 0, (width - 1) / 2], [0, 60.0, (height - 1) / 2], [0, 0, 1]])
    rgb = ramp_image(height, width)
    truth = 2.5 * (rgb[..., 0] / 255.0 + 1.0) + 0.3
    store = get_typestore(Stores.ROS2_HUMBLE)
    types = store.types
    points = surface_scan(truth, K, np.eye(4))[None]
    packed = pack_cloud(points)
    field = types["sensor_msgs/msg/PointField"]

    def messages(header) -> dict[str, object]:
        image = types["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="rgb8",
                                               is_bigendian=0, step=width * 3, data=rgb.reshape(-1))  # fmt: skip
        info = recorded_camera_info(store, header, K, width, height)
        cloud = types["sensor_msgs/msg/PointCloud2"](
            header=header, height=1, width=points.shape[1], is_bigendian=False, point_step=packed.point_step,
            row_step=packed.point_step * points.shape[1], data=np.frombuffer(packed.payload, np.uint8), is_dense=False,
            fields=[field(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in packed.fields],
        )  # fmt: skip
        return {IMAGE_TOPIC: image, f"{KITTI_CAMERA}/camera_info": info, "/kitti/velo/pointcloud": cloud}

    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for number, (stamp, logged, scan_delay_s) in enumerate(frames):
            time = types["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9)
            for topic, message in messages(types["std_msgs/msg/Header"](stamp=time, frame_id="camera")).items():
                delay = scan_delay_s if topic == "/kitti/velo/pointcloud" else 0.0
                if delay is None:
                    continue
                if topic not in connections:
                    connections[topic] = writer.add_connection(topic, message.__msgtype__, typestore=store)
                raw = store.serialize_cdr(message, message.__msgtype__)
                if topic == IMAGE_TOPIC and number in cut:
                    raw = raw[: len(raw) // 2]
                writer.write(connections[topic], logged + int(delay * 1e9), raw)
    return truth


def write_synthetic_bag(path: Path, scan_delay_s: float) -> np.ndarray:
    """A one-frame mcap: ramp image + camera_info at t, a scan of the true surface logged scan_delay_s later."""
    stamp = 1_700_000_000_000_000_000
    return write_ramp_bag(path, [(stamp, stamp, scan_delay_s)])


def read_all(path: Path, topic: str) -> dict[int, object]:
    """Header stamp (ns) -> message of every message on `topic`."""
    with AnyReader([path]) as reader:
        connections = [c for c in reader.connections if c.topic == topic]
        messages = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=connections)]
    return {m.header.stamp.sec * 10**9 + m.header.stamp.nanosec: m for m in messages}


@pytest.mark.parametrize("scan_delay_s", [0.02, 0.3])
def test_a_scan_logged_after_its_image_is_paired_within_lidar_max_dt(tmp_path, capsys, scan_delay_s):
    truth = write_synthetic_bag(tmp_path / "in", scan_delay_s)
    model = ramp_model(tmp_path / "ramp.onnx", size=truth.shape)
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model), "-p", "use_lidar:=true"]) == 0
    out, depth = capsys.readouterr().out, depth_array(read_bag(tmp_path / "out")["/depth"][1])
    if scan_delay_s <= 0.05:  # the scan's header stamp equals the image's: paired although logged later
        assert "1/1 frames aligned to LiDAR" in out
        np.testing.assert_allclose(depth, truth, rtol=0.01)
    else:  # logged too late to wait for: the metric model's own (wrong) scale, and a warning
        assert "1 x no LiDAR scan within lidar_max_dt=0.05 s of the image: frame not aligned" in out
        np.testing.assert_allclose(depth, (truth - 0.3) / 2.5, rtol=1e-3)


def test_stamps_jumping_back_reset_the_lidar_scale_prior_as_in_the_node(tmp_path, capsys):
    """A bag recorded over a looping player: the scale fitted before the loop must not carry over to its start."""
    end, start, second = 100 * 10**9, 1 * 10**9, 10**9
    frames = [
        (end, end, 0.0),  # a scan: fitted
        (end + second // 10, end + second // 10, None),  # no scan: the prior holds the scale
        (start, end + second // 5, None),  # the stream starts over (logged later, stamped earlier), no scan yet
    ]
    truth = write_ramp_bag(tmp_path / "in", frames)
    model = ramp_model(tmp_path / "ramp.onnx", size=truth.shape)
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model), "-p", "use_lidar:=true"]) == 0
    out = capsys.readouterr().out
    depth = {stamp: depth_array(message) for stamp, message in read_all(tmp_path / "out", "/depth").items()}
    assert sorted(depth) == sorted(stamp for stamp, _, _ in frames)
    np.testing.assert_allclose(depth[end], truth, rtol=0.01)
    np.testing.assert_allclose(depth[end + second // 10], truth, rtol=0.01)  # from the prior
    np.testing.assert_allclose(depth[start], (truth - 0.3) / 2.5, rtol=1e-3)  # reset: the model's own scale
    assert (
        "depth_node_bag: image stamps went back more than 1 s (a new stream): LiDAR scale prior reset (by 99.1 s)"
        in out
    )
    assert "  1 x image stamps went back more than 1 s (a new stream): LiDAR scale prior reset" in out
    assert "2/3 frames aligned to LiDAR" in out


def write_compressed_bag(path: Path, images: list[bytes]) -> None:
    """An mcap of PNG/JPEG frames on the KITTI compressed topic, each with a 48x64 camera_info, 0.1 s apart."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = get_typestore(Stores.ROS2_HUMBLE)
    types, K = store.types, np.array([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]])
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for number, data in enumerate(images):
            stamp = 10**9 * (1 + number // 10) + 10**8 * (number % 10)
            time = types["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9)
            header = types["std_msgs/msg/Header"](stamp=time, frame_id="camera")
            info = recorded_camera_info(store, header, K, 64, 48)
            image = types["sensor_msgs/msg/CompressedImage"](
                header=header, format="png", data=np.frombuffer(data, np.uint8)
            )
            for topic, message in ((f"{KITTI_CAMERA}/camera_info", info), (f"{IMAGE_TOPIC}/compressed", image)):
                if topic not in connections:
                    connections[topic] = writer.add_connection(topic, message.__msgtype__, typestore=store)
                writer.write(connections[topic], stamp, store.serialize_cdr(message, message.__msgtype__))


def run_measured(in_bag: Path, out_bag: Path, model: Path) -> tuple[subprocess.CompletedProcess, int]:
    """The bag tool in a fresh process: (its result, its peak resident memory in bytes)."""
    script = (
        "import resource, sys; from depth_node.bag import main; code = main(sys.argv[1:]); "
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
    )
    arguments = [str(in_bag), str(out_bag), "--model", str(model), "-p", "image_transport:=compressed"]
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=300,
                            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result, int(result.stdout.split("peak ")[-1]) * 1024


def test_a_decompression_bomb_in_a_bag_is_skipped_unread_with_memory_and_output_bounded(tmp_path):
    import cv2

    rgb = ramp_image(48, 64)
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    bomb = png_bomb(12000, 12000)  # 144 MP: 432 MB once decoded
    model = ramp_model(tmp_path / "ramp.onnx", size=(48, 64))
    write_compressed_bag(tmp_path / "bombed", [png, bomb, png])
    write_compressed_bag(tmp_path / "clean", [png, png, png])
    bombed, bombed_peak = run_measured(tmp_path / "bombed", tmp_path / "bombed_out", model)
    _, clean_peak = run_measured(tmp_path / "clean", tmp_path / "clean_out", model)
    warning = "frame skipped: CompressedImage declares 12000x12000 (144.0 MP), more than max_image_pixels=40000000"
    assert f"depth_node_bag: warning: {warning}" in bombed.stdout and f"  1 x {warning}" in bombed.stdout
    assert "depth_node_bag: 2 frames" in bombed.stdout
    assert bombed_peak - clean_peak < 100 * 2**20, (bombed_peak, clean_peak)  # nothing near 432 MB was allocated
    depth = read_all(tmp_path / "bombed_out", "/depth")
    assert sorted(depth) == [10**9, 12 * 10**8]  # the frames before and after the bomb
    np.testing.assert_allclose(depth_array(depth[12 * 10**8]), rgb[..., 0] / 255.0 + 1.0, atol=1e-4)
    size = sum(f.stat().st_size for f in (tmp_path / "bombed_out").iterdir())
    assert size < 2 * sum(f.stat().st_size for f in (tmp_path / "clean_out").iterdir())


# --- real-world trouble ------------------------------------------------------------------------------------------
def bag_tool(*arguments: str, limit_bytes: int | None = None, **popen) -> subprocess.Popen:
    """`depth_node_bag ...` in its own process; with limit_bytes no file it writes may grow past that size (the
    kernel refuses the write, as on a full disk)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen(
        [str(Path(sys.executable).parent / "depth_node_bag"), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        preexec_fn=limit if limit_bytes else None,  # noqa: PLW1509 - only setrlimit and signal, before exec
        **popen,
    )


def test_undecodable_messages_are_skipped_counted_and_not_copied(tmp_path, capsys):
    stamps = [10**9 + n * 10**8 for n in range(4)]
    truth = write_ramp_bag(tmp_path / "in", [(s, s, None) for s in stamps], cut=(1,))
    model = ramp_model(tmp_path / "ramp.onnx", size=truth.shape)
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert f"  1 x undecodable message on {IMAGE_TOPIC} skipped (not copied)" in out
    assert "depth_node_bag: 3 frames" in out
    images, depth = read_all(tmp_path / "out", IMAGE_TOPIC), read_all(tmp_path / "out", "/depth")
    assert sorted(images) == sorted(depth) == [stamps[0], *stamps[2:]]  # the damaged one neither copied nor processed
    np.testing.assert_allclose(depth_array(depth[stamps[3]]), (truth - 0.3) / 2.5, rtol=1e-3)


@pytest.mark.parametrize("where", ["under a file", "read-only folder"])
def test_an_output_path_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, capsys, where):
    truth = write_synthetic_bag(tmp_path / "in", 0.0)
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "out" if where == "under a file" else Path("/sys/depth_node_bag_test_out")
    model = ramp_model(tmp_path / "ramp.onnx", size=truth.shape)
    assert main([str(tmp_path / "in"), str(out), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    reason = "Not a directory" if where == "under a file" else "Operation not permitted"
    assert err == f"depth_node_bag: error: cannot write output bag {out}: {reason}\n"
    assert not out.exists() and (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.slow
def test_a_full_disk_is_one_line_leaves_nothing_and_a_rerun_succeeds(tmp_path):
    stamps = [10**9 + n * 10**8 for n in range(40)]
    truth = write_ramp_bag(tmp_path / "in", [(s, s, None) for s in stamps], size=(96, 128))
    model = ramp_model(tmp_path / "ramp.onnx", size=truth.shape)
    arguments = (str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model))
    stdout, stderr = bag_tool(*arguments, limit_bytes=2_000_000).communicate(timeout=120)  # ~13 MB to write
    assert (
        stderr.splitlines()[-1] == f"depth_node_bag: error: cannot write output bag {tmp_path / 'out'}: File too large"
    )
    assert "Traceback" not in stderr + stdout and not (tmp_path / "out").exists()
    rerun = bag_tool(*arguments)
    assert rerun.wait(timeout=120) == 0 and len(read_all(tmp_path / "out", "/depth")) == len(stamps)


@pytest.mark.slow
def test_sigint_leaves_a_valid_partial_bag_clearly_named(tmp_path):
    stamps = [10**9 + n * 10**8 for n in range(400)]
    truth = write_ramp_bag(tmp_path / "in", [(s, s, None) for s in stamps], size=(192, 256), cut=(0,))
    model = ramp_model(tmp_path / "ramp.onnx", size=(48, 64))
    out = tmp_path / "out"
    process = bag_tool(str(tmp_path / "in"), str(out), "--model", str(model), "-p", "publish_points:=false")
    written = out / "out.mcap"
    deadline = time.monotonic() + 60
    while not (written.is_file() and written.stat().st_size > 2_000_000):  # ~10 of 400 frames written: under way
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    partial = tmp_path / "out.partial"
    frames = len(read_all(partial, "/depth"))  # a valid bag: index and metadata.yaml written
    assert 0 < frames < len(stamps) - 1 and (partial / "metadata.yaml").is_file() and not out.exists()
    assert stderr.splitlines()[-1] == f"depth_node_bag: interrupted: a partial bag of {frames} frames in {partial} left"
    assert "Traceback" not in stderr + stdout and "KeyboardInterrupt" not in stderr
    depth = depth_array(read_all(partial, "/depth")[stamps[1]])  # the model's output, back at 192x256
    np.testing.assert_allclose(depth[:, 32:-32], ((truth - 0.3) / 2.5)[:, 32:-32], atol=0.02)
