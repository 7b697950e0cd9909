"""TensorRT: everything up to the TensorRT API runs everywhere (the ONNX graphs it consumes, calibration batching,
engine cache keys, the sidecar's refusal of a stale engine, ONNX Runtime fallback); the engine builds and runs
only where the TensorRT Python package and a CUDA GPU exist, and skip with the reason elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from depth_node.engine import ModelLoadError, open_engine, plan_input, preprocess
from depth_node.metadata import read_onnx_metadata
from depth_node.trt_backend import (
    SIDECAR_FORMAT,
    BackendUnavailable,
    check_sidecar,
    engine_cache_key,
    gpu_name,
    read_sidecar,
    sha256_file,
)
from distill.cli import main
from distill.errors import UserError
from distill.models import build_student
from distill.verbs.calibration import calibration_batches, calibration_images
from distill.verbs.export import export_onnx
from distill.verbs.export_trt import build_engine, optimisation_profile, timing_cache_name
from distill.verbs.parity import relative_error, smooth_random_image

SIZE = (64, 192)
ROSBAG = "kitti_rosbag2_sample/kitti_0001_f5_mcap"
KITTI_IMAGES = "kitti_raw_sample/2011_09_26/2011_09_26_drive_0001_sync"
# Operators the TensorRT ONNX parser supports (onnx-tensorrt docs/operators.md), limited to those a CNN or ViT
# depth model can plausibly export to; an op outside it means the engine build would fail.
TENSORRT_OPS = frozenset(
    "Abs Add And ArgMax AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv "
    "ConvTranspose CumSum DepthToSpace Div Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements Gemm "
    "GlobalAveragePool GlobalMaxPool Greater HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization "
    "LeakyRelu Less Log MatMul Max MaxPool Mean Min Mul Neg Not Pad Pow PRelu Range Reciprocal ReduceL2 ReduceMax "
    "ReduceMean ReduceMin ReduceSum Relu Reshape Resize Shape Sigmoid Sign Slice Softmax Softplus SpaceToDepth Split "
    "Sqrt Squeeze Sub Tanh Tile TopK Transpose Unsqueeze Where".split()
)
RESIZE_MODES = {b"half_pixel", b"pytorch_half_pixel", b"align_corners", b"asymmetric"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A tiny EfficientNet-B0 student exported static and dynamic, as TensorRT would receive it."""
    out = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = build_student("efficientnet_b0", decoder_width=16, bins=16).eval()
    static, _ = export_onnx(model, out, SIZE, dynamic=False, opset=17, config={})
    dynamic, _ = export_onnx(model, out, SIZE, dynamic=True, opset=17, config={})
    return {"static": static, "dynamic": dynamic}


@pytest.fixture
def trt_gpu():
    """The tensorrt module on a machine with a CUDA GPU; skips with the precise reason otherwise."""
    reason = "TensorRT Python package not installed (not installable in this workplace)"
    trt = pytest.importorskip("tensorrt", reason=reason)
    try:
        gpu_name(0)
    except BackendUnavailable as error:
        pytest.skip(f"TensorRT installed but no usable CUDA GPU: {error}")
    return trt


def write_sidecar(engine: Path, onnx_path: Path, tensorrt: str = "10.0.0", gpu: str = "NVIDIA Test GPU") -> dict:
    sidecar = {
        "format": SIDECAR_FORMAT,
        "key": engine_cache_key(sha256_file(onnx_path), tensorrt, gpu, "fp16"),
        "tensorrt": tensorrt,
        "gpu": gpu,
        "precision": "fp16",
        "onnx": onnx_path.name,
        "metadata": json.loads(read_onnx_metadata(onnx_path).to_json()),
    }
    engine.with_name(engine.name + ".json").write_text(json.dumps(sidecar))
    return sidecar


# --- the ONNX graphs TensorRT consumes -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_exported_graph_is_what_the_tensorrt_parser_takes(exported, kind):
    model = onnx.load(str(exported[kind]))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["depth", "confidence"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ([1, 3, *SIZE] if kind == "static" else ["batch", 3, "height", "width"])
    for output in model.graph.output:
        assert output.type.tensor_type.shape.dim[1].dim_value == 1
    assert {op.domain: op.version for op in model.opset_import}[""] == 17
    ops = {node.op_type for node in model.graph.node}
    assert ops <= TENSORRT_OPS, f"ops TensorRT cannot parse: {ops - TENSORRT_OPS}"
    for node in model.graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Resize":
            assert attributes["mode"] in (b"linear", b"nearest")
            assert attributes["coordinate_transformation_mode"] in RESIZE_MODES


# --- cache keys and sidecars -----------------------------------------------------------------------------------------


def test_engine_cache_key_changes_with_everything_that_invalidates_an_engine():
    base = ("ab" * 32, "10.3.0", "NVIDIA GeForce RTX 4090", "fp16")
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base)  # pure
    assert key.startswith("trt10.3.0-nvidia-geforce-rtx-4090-fp16-")
    variants = [("cd" * 32, *base[1:]), (base[0], "10.4.0", *base[2:]), (*base[:2], "NVIDIA A100", base[3])]
    variants += [(*base[:3], "int8")]
    keys = {engine_cache_key(*v) for v in variants} | {engine_cache_key(*base, profile="[1, 3, 64, 64]")}
    assert len(keys) == 5 and key not in keys
    with pytest.raises(ValueError, match="precision"):
        engine_cache_key(base[0], base[1], base[2], "bf16")


def test_sidecar_of_another_tensorrt_or_gpu_is_refused(exported, tmp_path):
    engine = tmp_path / "model.engine"
    sidecar = write_sidecar(engine, exported["static"], tensorrt="10.0.1", gpu="NVIDIA A100")
    with pytest.raises(ModelLoadError) as error:
        check_sidecar(sidecar, engine, "10.3.0", "NVIDIA A100")
    message = str(error.value)
    assert "model.engine" in message and "TensorRT 10.0.1" in message and "10.3.0" in message and "rebuild" in message
    with pytest.raises(ModelLoadError, match="on 'NVIDIA A100', but this machine has TensorRT 10.0.1 on 'Jetson'"):
        check_sidecar(sidecar, engine, "10.0.1", "Jetson")
    assert check_sidecar(read_sidecar(engine), engine, "10.0.1", "NVIDIA A100").input_size == SIZE


def test_sidecar_errors_name_the_file(tmp_path):
    engine = tmp_path / "model.engine"
    with pytest.raises(ModelLoadError, match="no sidecar model.engine.json"):
        read_sidecar(engine)
    engine.with_name("model.engine.json").write_text("{")
    with pytest.raises(ModelLoadError, match="model.engine.json: engine sidecar is not valid JSON"):
        read_sidecar(engine)
    engine.with_name("model.engine.json").write_text(json.dumps({"format": SIDECAR_FORMAT, "key": "k"}))
    with pytest.raises(ModelLoadError, match="lacks tensorrt, gpu, precision, metadata"):
        read_sidecar(engine)


def test_an_engine_without_its_sidecar_is_reported_as_such_before_tensorrt_is_imported(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError) as error:
        open_engine(engine, "tensorrt")
    assert "tensorrt: " + str(engine) + ": no sidecar model.engine.json beside the engine" in str(error.value)
    assert "not installed" not in str(error.value)  # whether TensorRT is here or not


def test_stale_engine_falls_back_to_onnx_runtime_with_the_reason(exported, tmp_path):
    onnx_path = tmp_path / exported["static"].name
    onnx_path.write_bytes(exported["static"].read_bytes())
    engine = tmp_path / "model.trt0.0.0.engine"
    engine.write_bytes(b"not an engine for this machine")
    write_sidecar(engine, onnx_path, tensorrt="0.0.0-elsewhere")
    fallback = open_engine(engine, backend="auto")
    assert fallback.backend_name == "onnxruntime[CPUExecutionProvider]"
    assert fallback.fallbacks[0].startswith("tensorrt: ")
    assert fallback.infer(smooth_random_image(SIZE, 0)).depth.shape == SIZE
    with pytest.raises(ModelLoadError, match="no tensorrt backend could run it"):
        open_engine(engine, backend="tensorrt")


# --- build settings and calibration data -----------------------------------------------------------------------------


def test_optimisation_profile_spans_half_to_one_and_a_half_size():
    profile = optimisation_profile((352, 1216), 32)
    assert profile == {"min": (1, 3, 160, 608), "opt": (1, 3, 352, 1216), "max": (4, 3, 544, 1824)}
    for shapes in zip(*profile.values()):
        assert shapes[0] <= shapes[1] <= shapes[2]
    assert all(side % 32 == 0 for shape in profile.values() for side in shape[2:])
    assert timing_cache_name("10.3.0", "NVIDIA A100") == "timing-trt10.3.0-nvidia-a100.cache"


def test_calibration_batches_from_a_folder_match_the_runtime(exported, tmp_path, shared_data):
    folder = tmp_path / "images"
    folder.mkdir()
    kitti = cv2.imread(str(shared_data / KITTI_IMAGES / "image_02" / "data" / "0000000005.png"))
    for index in range(5):
        cv2.imwrite(str(folder / f"{index}.png"), np.roll(kitti, 40 * index, axis=1))
    cv2.imwrite(str(folder / "depth.png"), np.full((20, 30), 5000, np.uint16))  # skipped: 16-bit
    cv2.imwrite(str(folder / "grey.png"), np.zeros((20, 30), np.uint8))  # skipped: grey
    meta = read_onnx_metadata(exported["static"])
    batches = list(calibration_batches(calibration_images(folder), meta, SIZE, batch_size=2, limit=100))
    assert len(batches) == 2  # 5 colour images: two full batches, the fifth dropped
    assert all(b.shape == (2, 3, *SIZE) and b.dtype == np.float32 for b in batches)
    first = cv2.cvtColor(kitti, cv2.COLOR_BGR2RGB)
    expected = preprocess(first, plan_input(first.shape[:2], SIZE, "stretch"), meta.mean, meta.std)[0]
    np.testing.assert_allclose(batches[0][0], expected)
    assert len(list(calibration_batches(calibration_images(folder), meta, SIZE, batch_size=1, limit=3))) == 3


def test_calibration_images_from_a_rosbag(shared_data):
    images = list(calibration_images(shared_data / ROSBAG))
    assert images and images[0].shape == (375, 1242, 3) and images[0].dtype == np.uint8


def test_calibration_source_errors(tmp_path):
    with pytest.raises(UserError, match="calibration data not found"):
        next(calibration_images(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no 8-bit colour images"):
        next(calibration_images(tmp_path))


def test_engine_export_without_tensorrt_says_what_is_missing(exported, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: the engine tests below cover this path")
    except ImportError:
        pass
    code = main(["export", str(exported["static"]), "--out", str(tmp_path), "--format", "engine", "--fp16"])
    assert code == 2
    assert "--format engine needs TensorRT 10" in capsys.readouterr().err


# --- real TensorRT (skipped without the package and a GPU) ------------------------------------------------------------


def ort_and_engine_depth(onnx_path: Path, engine_path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Depth of the same image from ONNX Runtime and from the engine."""
    image = smooth_random_image(size, 3)
    input_size = size if read_onnx_metadata(onnx_path).dynamic else None
    ort = open_engine(onnx_path, backend="onnxruntime-cpu", input_size=input_size)
    trt = open_engine(engine_path, backend="tensorrt", input_size=input_size)
    assert trt.backend_name.startswith("tensorrt[")
    return ort.infer(image).depth, trt.infer(image).depth


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 5e-2)])
def test_engine_matches_onnx_runtime(trt_gpu, exported, tmp_path, precision, tolerance):
    meta = read_onnx_metadata(exported["static"])
    engine = build_engine(exported["static"], tmp_path, precision, meta, SIZE)
    assert read_sidecar(engine)["tensorrt"] == trt_gpu.__version__ and (tmp_path / engine.name).is_file()
    expected, actual = ort_and_engine_depth(exported["static"], engine, SIZE)
    assert relative_error(actual, expected) <= tolerance
    again = build_engine(exported["static"], tmp_path, precision, meta, SIZE)
    assert again == engine  # cached: same ONNX, TensorRT, GPU and precision


@pytest.mark.gpu
def test_dynamic_engine_runs_at_two_sizes(trt_gpu, exported, tmp_path):
    engine = build_engine(exported["dynamic"], tmp_path, "fp32", read_onnx_metadata(exported["dynamic"]), SIZE)
    assert read_sidecar(engine)["profile"]["opt"] == [1, 3, *SIZE]
    for size in [SIZE, (96, 256)]:
        expected, actual = ort_and_engine_depth(exported["dynamic"], engine, size)
        assert relative_error(actual, expected) <= 1e-3


@pytest.mark.gpu
def test_int8_engine_calibrates_from_images(trt_gpu, exported, tmp_path, shared_data):
    source = shared_data / KITTI_IMAGES / "image_02" / "data"
    engine = build_engine(exported["static"], tmp_path, "int8", read_onnx_metadata(exported["static"]), SIZE, source)
    assert engine.with_suffix(".calib").is_file()
    expected, actual = ort_and_engine_depth(exported["static"], engine, SIZE)
    assert np.isfinite(actual).all() and np.median(np.abs(actual - expected) / expected) < 0.2


@pytest.mark.gpu
def test_auto_prefers_the_cached_engine_of_an_onnx_model(trt_gpu, exported, tmp_path):
    onnx_path = tmp_path / exported["static"].name
    onnx_path.write_bytes(exported["static"].read_bytes())
    build_engine(onnx_path, tmp_path, "fp16", read_onnx_metadata(onnx_path), SIZE)
    assert open_engine(onnx_path, backend="auto").backend_name.startswith("tensorrt[")
