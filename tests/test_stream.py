"""The frame stream without ROS: plain message-like objects in (the field names rclpy and rosbags messages share),
what the node and the bag tool both get out: skipped frames counted and reported, CameraInfo scaled, the outputs a
frame produces, and the timings on an injected clock."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from node_fixtures import ramp_image, ramp_model

from depth_node import params
from depth_node.engine import open_engine
from depth_node.image_codec import numpy_to_image_fields
from depth_node.pipeline import DepthPipeline, PipelineOptions
from depth_node.stream import Event, FrameStream

HEIGHT, WIDTH = 48, 64


def header(stamp_ns: int) -> SimpleNamespace:
    return SimpleNamespace(stamp=SimpleNamespace(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id="cam")


def image(stamp_ns: int) -> SimpleNamespace:
    return SimpleNamespace(header=header(stamp_ns), **numpy_to_image_fields(ramp_image(HEIGHT, WIDTH), "rgb8"))


def camera_info(width: int, height: int) -> SimpleNamespace:
    k = [100.0, 0.0, (width - 1) / 2, 0.0, 100.0, (height - 1) / 2, 0.0, 0.0, 1.0]
    roi = SimpleNamespace(x_offset=0, y_offset=0, width=0, height=0, do_rectify=False)
    return SimpleNamespace(header=header(0), width=width, height=height, distortion_model="plumb_bob", d=[0.0] * 5,
                           k=k, r=[1.0, 0, 0, 0, 1, 0, 0, 0, 1], p=k[:3] + [0.0] + k[3:6] + [0.0] + k[6:] + [0.0],
                           binning_x=0, binning_y=0, roi=roi)  # fmt: skip


def test_a_frame_through_the_stream_with_an_injected_clock(tmp_path):
    engine = open_engine(ramp_model(tmp_path / "ramp.onnx", size=(HEIGHT, WIDTH)), "onnxruntime-cpu")
    values = params.resolve({"model": "ramp.onnx"})
    now, events = [10.0], []
    stream = FrameStream(DepthPipeline(engine, PipelineOptions.from_params(values)), values, events.append,
                         clock=lambda: now[0])  # fmt: skip
    assert stream.process(image(10**9)) is None  # no camera_info yet
    assert events == [Event("camera_info", "no camera_info received yet: frame skipped")]
    assert (stream.counters.no_camera_info, stream.counters.frames_out) == (1, 0)

    stream.on_camera_info(camera_info(2 * WIDTH, 2 * HEIGHT))  # a camera at twice the image size
    frame = stream.process(image(2 * 10**9), received=9.5)
    assert list(frame.outputs()) == ["depth", "depth/camera_info", "points"]  # metric, no bins
    np.testing.assert_allclose(frame.result.depth, ramp_image(HEIGHT, WIDTH)[..., 0] / 255.0 + 1.0, atol=1e-4)
    info = frame.outputs()["depth/camera_info"]
    assert (info.width, info.height) == (WIDTH, HEIGHT) and np.allclose(info.k[0], 50.0)
    now[0] = 10.25
    stages = stream.finish(frame, messages=1.0)
    assert stages["wait"] == 500.0 and stages["total"] == 750.0 and stages["messages"] == 1.0
    assert stream.counters.frames_out == 1 and stream.last_result is frame.result and stream.stages[-1] is stages
    assert (frame.stamp, frame.frame_id) == (2 * 10**9, "cam")
