"""The torch-free runtime: metadata, pre/post-processing geometry, backend choice and load errors.

The models here are small real ONNX graphs whose output is known in closed form: depth = red/255 + 1 and
confidence = green/255 of the network input (de-normalised), so any resize, crop or padding mistake shows up as a
wrong value at a known pixel. Exported students are tested in test_export.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from depth_node.engine import (
    BACKENDS,
    InputGeometry,
    ModelLoadError,
    ModelMetadata,
    open_engine,
    plan_input,
    preprocess,
    resize_method,
)
from depth_node.metadata import METADATA_KEY, read_onnx_metadata

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_model(path, size=(32, 64), bins=0, min_depth=0.5, max_depth=3.0, kind="metric", metadata=True, **meta):
    """A real ONNX model: depth = de-normalised red + 1 (metres), confidence = de-normalised green."""

    def const(name: str, dtype, value) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [1], [value]))

    def channel(index: int, name: str) -> list:
        return [
            const(f"{name}_start", TensorProto.INT64, index),
            const(f"{name}_end", TensorProto.INT64, index + 1),
            const(f"{name}_axis", TensorProto.INT64, 1),
            helper.make_node("Slice", ["image", f"{name}_start", f"{name}_end", f"{name}_axis"], [f"{name}_n"]),
            const(f"{name}_s", TensorProto.FLOAT, STD[index]),
            helper.make_node("Mul", [f"{name}_n", f"{name}_s"], [f"{name}_m"]),
            const(f"{name}_o", TensorProto.FLOAT, MEAN[index]),
            helper.make_node("Add", [f"{name}_m", f"{name}_o"], [f"{name}_01"]),
        ]

    dims = ["batch", 3, "height", "width"] if size is None else [1, 3, *size]
    out_dims = [dims[0], 1, dims[2], dims[3]]
    nodes = channel(0, "red") + [
        const("one", TensorProto.FLOAT, 1.0),
        helper.make_node("Add", ["red_01", "one"], ["depth"]),
    ]
    outputs = [helper.make_tensor_value_info("depth", TensorProto.FLOAT, out_dims)]
    if bins:
        nodes += channel(1, "green") + [helper.make_node("Identity", ["green_01"], ["confidence"])]
        outputs.append(helper.make_tensor_value_info("confidence", TensorProto.FLOAT, out_dims))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        fields = dict(input_size=size, mean=MEAN, std=STD, min_depth=min_depth, max_depth=max_depth, output_kind=kind,
                      bins=bins, arch="tiny", dynamic=size is None, size_divisor=32) | meta  # fmt: skip
        model.metadata_props.add(key=METADATA_KEY, value=ModelMetadata(**fields).to_json())
    onnx.save(model, str(path))
    return path


def smooth_image(height: int, width: int) -> np.ndarray:
    """Red ramps left to right, green top to bottom: linear, so bilinear resampling reproduces it."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.linspace(10, 245, width)[None, :]
    image[..., 1] = np.linspace(20, 235, height)[:, None]
    image[..., 2] = 128
    return image


# --- metadata ---------------------------------------------------------------------------------------------------


def test_metadata_round_trips_through_json_and_onnx(tmp_path):
    meta = ModelMetadata((32, 64), MEAN, STD, 0.5, 80.0, "metric", bins=64, arch="efficientnet_b0", version="0.1.0")
    assert meta.outputs == ("depth", "confidence")
    assert ModelMetadata.from_json(meta.to_json()) == meta
    data = json.loads(meta.to_json())
    assert data["input_size"] == [32, 64] and data["depth_units"] == "m" and data["input_layout"] == "NCHW"
    path = write_model(tmp_path / "m.onnx", bins=8)
    read = read_onnx_metadata(path)
    assert read.input_size == (32, 64) and read.bins == 8 and read.outputs == ("depth", "confidence")


def test_dynamic_metadata_has_no_input_size():
    meta = ModelMetadata(None, MEAN, STD, 0.1, 10.0, "relative_disparity", dynamic=True)
    assert ModelMetadata.from_json(meta.to_json()).input_size is None
    legacy = {**json.loads(meta.to_json()), "input_size": [-1, -1]}
    assert ModelMetadata.from_dict(legacy).input_size is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output_kind": "inverse"}, "output_kind"),
        ({"min_depth": 5.0, "max_depth": 1.0}, "min_depth < max_depth"),
        ({"std": [0.2, 0.0, 0.2]}, "std > 0"),
        ({"outputs": ["depth"], "bins": 16}, "outputs"),
        ({"input_size": None}, "dynamic is false"),
    ],
)
def test_invalid_metadata_is_refused_naming_the_file(change, message):
    good = json.loads(ModelMetadata((32, 64), MEAN, STD, 0.5, 80.0, "metric").to_json())
    with pytest.raises(ModelLoadError, match=message) as error:
        ModelMetadata.from_dict({**good, **change}, "model.onnx")
    assert "model.onnx" in str(error.value)


def test_metadata_missing_keys_and_bad_json():
    with pytest.raises(ModelLoadError, match="lacks max_depth, min_depth"):
        ModelMetadata.from_dict({"input_size": [1, 1], "mean": MEAN, "std": STD, "output_kind": "metric"}, "m.onnx")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ModelMetadata.from_json("{oops", "m.onnx")


# --- geometry -----------------------------------------------------------------------------------------------------


def test_letterbox_keeps_aspect_ratio_and_centres():
    geometry = plan_input((375, 1242), (352, 1216), "letterbox")
    scale_y, scale_x = geometry.scale
    assert abs(scale_y - scale_x) < 2 / 352  # equal up to whole-pixel rounding
    assert geometry.content_size == (352, round(1242 * 352 / 375))  # height binds; the width is padded
    assert geometry.left == (1216 - geometry.content_size[1]) // 2 and geometry.top == 0
    stretch = plan_input((375, 1242), (352, 1216), "stretch")
    assert stretch.content_size == (352, 1216) and stretch.scale != pytest.approx(geometry.scale)


def test_input_intrinsics_follow_the_pixels():
    K = np.array([[721.5, 0, 609.6], [0, 721.5, 172.9], [0, 0, 1]])
    points = np.array([[1.0, 0.5, 10.0], [-4.0, 1.0, 30.0], [0.2, -0.3, 5.0]])
    for mode in ("letterbox", "stretch"):
        geometry = plan_input((375, 1242), (352, 1216), mode)
        scale_y, scale_x = geometry.scale
        pixels = points @ K.T
        u, v = pixels[:, 0] / pixels[:, 2], pixels[:, 1] / pixels[:, 2]
        # The resize maps pixel centres as u' = (u + 0.5) * s - 0.5, then the padding shifts them.
        expected = np.stack([(u + 0.5) * scale_x - 0.5 + geometry.left, (v + 0.5) * scale_y - 0.5 + geometry.top], 1)
        projected = points @ geometry.input_intrinsics(K).T
        np.testing.assert_allclose(projected[:, :2] / projected[:, 2:], expected, atol=1e-9)


def test_preprocess_normalises_and_pads_with_the_mean():
    image = smooth_image(30, 90)
    geometry = plan_input((30, 90), (32, 64), "letterbox")
    batch = preprocess(image, geometry, MEAN, STD)
    assert batch.shape == (1, 3, 32, 64) and batch.dtype == np.float32
    assert np.all(batch[0, :, : geometry.top] == 0)  # padding = the mean colour = 0 after normalisation
    resized = cv2.resize(image, geometry.content_size[::-1], interpolation=cv2.INTER_LINEAR)  # a mild shrink
    content = batch[0, :, geometry.top : geometry.top + geometry.content_size[0]]
    np.testing.assert_allclose(content[0], (resized[..., 0] / 255 - MEAN[0]) / STD[0], atol=1e-5)


def test_postprocess_writes_into_the_given_buffer(tmp_path):
    engine = open_engine(write_model(tmp_path / "m.onnx"), backend="onnxruntime-cpu")
    image = smooth_image(75, 250)
    out = np.full((75, 250), -1.0, np.float32)
    result = engine.infer(image, depth_out=out)
    assert result.depth is out
    np.testing.assert_array_equal(out, engine.infer(image).depth)
    with pytest.raises(ValueError, match="out must be float32"):
        engine.infer(image, depth_out=np.zeros((75, 249), np.float32))


def test_images_shrunk_more_than_twice_are_averaged_not_sampled():
    image = np.zeros((48, 120, 3), np.uint8)
    image[:, ::3] = 255  # every third column white: bilinear sampling at 3x hits only black ones, averaging 1/3
    geometry = plan_input((48, 120), (16, 40), "stretch")
    batch = preprocess(image, geometry, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(batch[0, 0], 1 / 3, atol=0.01)
    assert resize_method((375, 1242), (352, 1216)) == cv2.INTER_LINEAR  # KITTI to the deploy size: bilinear
    assert resize_method((720, 1280), (176, 608)) == cv2.INTER_AREA


# --- engine ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_outputs_come_back_at_the_image_resolution_with_geometry_kept(tmp_path, resize):
    engine = open_engine(write_model(tmp_path / "m.onnx", bins=16), backend="onnxruntime-cpu", resize=resize)
    image = smooth_image(75, 250)  # another aspect ratio than the 32x64 input
    result = engine.infer(image)
    assert result.depth.shape == (75, 250) and result.depth.dtype == np.float32
    assert result.confidence.shape == (75, 250)
    # depth = red/255 + 1 and confidence = green/255 of the *same* pixel: the padding never leaks and nothing shifts.
    # Tolerance: two linear resamplings of a ramp, plus the ramp's 8-bit quantisation.
    inner = (slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(result.depth[inner], image[..., 0][inner] / 255 + 1, atol=0.02)
    np.testing.assert_allclose(result.confidence[inner], image[..., 1][inner] / 255, atol=0.02)
    assert set(result.timings) == {"preprocess", "inference", "postprocess"}


def test_metric_depth_is_clamped_relative_is_not(tmp_path):
    image = smooth_image(32, 64)
    metric = open_engine(write_model(tmp_path / "a.onnx", min_depth=1.2, max_depth=1.8), backend="onnxruntime-cpu")
    depth = metric.infer(image).depth
    assert depth.min() == pytest.approx(1.2) and depth.max() == pytest.approx(1.8)
    relative = open_engine(write_model(tmp_path / "b.onnx", max_depth=1.8, kind="relative_depth"), "onnxruntime-cpu")
    assert relative.infer(image).depth.max() > 1.9
    assert relative.infer(image).confidence is None


def test_dynamic_model_runs_at_two_sizes(tmp_path):
    engine = open_engine(write_model(tmp_path / "d.onnx", size=None), backend="onnxruntime-cpu", resize="letterbox")
    for height, width in [(64, 128), (75, 250)]:
        image = smooth_image(height, width)
        geometry = engine.geometry_for((height, width))
        assert geometry.input_size == (-(-height // 32) * 32, -(-width // 32) * 32)
        assert geometry.content_size == (height, width)  # dynamic + letterbox: pad only, no resampling
        np.testing.assert_allclose(engine.infer(image).depth, image[..., 0] / 255 + 1, atol=1e-5)
    fixed = open_engine(tmp_path / "d.onnx", backend="onnxruntime-cpu", input_size=(32, 96))
    assert fixed.geometry_for((75, 250)).input_size == (32, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        open_engine(tmp_path / "d.onnx", backend="onnxruntime-cpu", input_size=(30, 96))


def test_auto_backend_falls_back_to_cpu_and_says_why(tmp_path):
    engine = open_engine(write_model(tmp_path / "m.onnx"), backend="auto", threads=1)
    assert engine.backend_name == "onnxruntime[CPUExecutionProvider]"
    assert any(reason.startswith("tensorrt:") for reason in engine.fallbacks)
    assert engine._runner.session.get_session_options().intra_op_num_threads == 1


# --- bad inputs: one clear error each -----------------------------------------------------------------------------


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found: .*missing.onnx"):
        open_engine(tmp_path / "missing.onnx")
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(ModelLoadError, match="notes.onnx: not a readable ONNX model"):
        open_engine(tmp_path / "notes.onnx")
    with pytest.raises(ModelLoadError, match="no 'depthkd' metadata"):
        open_engine(write_model(tmp_path / "plain.onnx", metadata=False))
    with pytest.raises(ModelLoadError, match=r"graph input is \(32, 64\) but its metadata says \(64, 64\)"):
        open_engine(write_model(tmp_path / "lying.onnx", input_size=(64, 64)))
    with pytest.raises(ModelLoadError, match="no sidecar"):
        (tmp_path / "model.engine").write_bytes(b"\x00" * 64)
        open_engine(tmp_path / "model.engine", backend="onnxruntime")
    with pytest.raises(ValueError, match="backend must be one of"):
        open_engine(tmp_path / "plain.onnx", backend="tflite")
    with pytest.raises(ValueError, match="resize mode"):
        open_engine(write_model(tmp_path / "ok.onnx"), resize="crop")


def test_unavailable_backend_is_a_load_error_with_the_reason(tmp_path):
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        open_engine(write_model(tmp_path / "m.onnx"), backend="onnxruntime-cuda")


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 64), np.uint8),
        np.zeros((32, 64, 4), np.uint8),
        np.zeros((32, 64, 3), np.float32),
        np.zeros((0, 64, 3), np.uint8),
        [[0, 0, 0]],
    ],
)
def test_bad_images_raise_value_error(tmp_path, image):
    engine = open_engine(write_model(tmp_path / "m.onnx"), backend="onnxruntime-cpu")
    with pytest.raises(ValueError, match="image"):
        engine.infer(image)


def test_backend_list_is_documented():
    assert BACKENDS[:3] == ("auto", "tensorrt", "onnxruntime")
    assert InputGeometry((2, 2), (2, 2), (2, 2)).scale == (1.0, 1.0)


def test_runtime_imports_neither_torch_nor_onnx():
    code = "import sys, depth_node.engine; print(sorted({'torch', 'onnx', 'distill', 'tensorrt'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- ONNX external data ------------------------------------------------------------------------------------------
# ONNX Runtime 1.20 (inside onnxruntime>=1.17) reads such locations; newer releases refuse some of them, with
# multi-line messages. The node refuses them itself, before creating a session, on every release.
def model_with_external_tensor(folder, location: str):
    """The closed-form model plus depth += a float32 tensor stored as external data at `location` (not checked)."""
    path = write_model(folder / "model.onnx")
    model = onnx.load(str(path))
    (final,) = [node for node in model.graph.node if "depth" in node.output]
    final.output[0] = "depth_base"
    model.graph.node.append(helper.make_node("Add", ["depth_base", "extra"], ["depth"]))
    extra = helper.make_tensor("extra", TensorProto.FLOAT, [1], [0.0])
    extra.ClearField("float_data")
    extra.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        extra.external_data.add(key=key, value=value)
    model.graph.initializer.append(extra)
    onnx.save(model, str(path))  # onnx.save leaves external references as they are
    return path


def test_external_data_beside_the_model_loads_and_is_used(tmp_path):
    (tmp_path / "weights.bin").write_bytes(np.float32(0.25).tobytes())
    engine = open_engine(model_with_external_tensor(tmp_path, "weights.bin"), "onnxruntime-cpu")
    image = np.zeros((32, 64, 3), np.uint8)
    image[..., 0] = 102  # red 0.4: depth 1.4 m, + 0.25 from the file
    np.testing.assert_allclose(engine.infer(image).depth, 1.65, atol=1e-4)


@pytest.mark.parametrize("kind", ["absolute", "parent", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_before_onnx_runtime_reads_it(
    tmp_path, kind, capsys, shared_data
):
    from depth_node.bag import main

    secret = tmp_path / "secret.bin"  # stands for /etc/passwd
    secret.write_bytes(np.float32(1.0).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    if kind == "symlink":
        (folder / "inside.bin").symlink_to(secret)
    location = {"absolute": str(secret), "parent": "../secret.bin", "symlink": "inside.bin"}[kind]
    path = model_with_external_tensor(folder, location)
    message = f"{path}: tensor 'extra' keeps its data in '{location}', outside the model's folder: refused"
    for load in (
        lambda: open_engine(path, "onnxruntime-cpu"),
        lambda: open_engine(path),
        lambda: read_onnx_metadata(path),
    ):
        with pytest.raises(ModelLoadError) as error:
            load()
        assert str(error.value).startswith(message), error.value
    bag = shared_data / "kitti_rosbag2_sample" / "kitti_0001_f5_mcap"
    assert main([str(bag), str(tmp_path / "out"), "--model", str(path)]) == 2  # the bag tool, as the node
    assert capsys.readouterr().err == f"depth_node_bag: error: {error.value}\n"
