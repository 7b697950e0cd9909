"""INT8 and FP16 ONNX exports: real files quantized/converted by ONNX Runtime's tools from tiny random-init students,
run by real ONNX Runtime sessions through the node's engine; metadata precision, the parity report against FP32,
`--random-init --config`, and the depth error report."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from node_fixtures import ramp_model

from depth_node.engine import open_engine
from depth_node.metadata import read_onnx_metadata
from distill.cli import main
from distill.errors import UserError
from distill.verbs.bench import run_bench
from distill.verbs.export import run_export
from distill.verbs.parity import compare_precision, image_feeds, smooth_random_image
from distill.verbs.quantize import HEAD_NODES, precision_path, quantize_int8

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 192)
TINY = {"model": {"kind": "student", "arch": "mobilenetv2_100", "bins": 16, "decoder_width": 16}}


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    """Four colour images of another size than the model's (the calibration resizes them as the node does)."""
    folder = tmp_path_factory.mktemp("calib")
    for seed in range(4):
        cv2.imwrite(str(folder / f"{seed}.png"), smooth_random_image((96, 320), seed))
    return folder


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def depth_of(path: Path, image: np.ndarray, size=None) -> np.ndarray:
    return open_engine(path, backend="onnxruntime-cpu", input_size=size).infer(image).depth


def test_int8_export_through_the_cli(tmp_path, calib_dir, tiny_config, capsys):
    argv = ["export", "--random-init", "--config", str(tiny_config), "--out", str(tmp_path), "--size", "64x192"]
    assert main([*argv, "--int8", "--calib", str(calib_dir)]) == 0
    printed = capsys.readouterr().out
    fp32, int8 = tmp_path / "mobilenetv2_100_64x192.onnx", tmp_path / "mobilenetv2_100_64x192_int8.onnx"
    assert "parity int8 vs fp32 (ONNX Runtime): median |Δdepth|" in printed and f"model:={int8.resolve()}" in printed
    meta, meta32 = read_onnx_metadata(int8), read_onnx_metadata(fp32)
    assert (meta.precision, meta32.precision, meta.random_init, meta.arch, meta.bins) == (
        "int8", "fp32", True, "mobilenetv2_100", 16,
    )  # fmt: skip
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "conv weights are stored as INT8"
    scales = {t.name: t for t in graph.initializer}
    weight_names = {t.name for t in int8_weights}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weight_names]
    assert any(len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1 for n in weight_dq)  # per-channel
    image = smooth_random_image((120, 400), 42)
    want, got = depth_of(fp32, image), depth_of(int8, image)  # the node's engine runs it unchanged
    assert got.shape == (120, 400) and np.isfinite(got).all()
    assert np.median(np.abs(got - want) / want) < 0.05


def test_fp16_export_keeps_float32_inputs_and_outputs(tmp_path, tiny_config):
    written = run_export(None, out=tmp_path, random_init=True, config=tiny_config, size=SIZE, fp16=True)
    assert [p.name for p in written] == ["mobilenetv2_100_64x192.onnx", "mobilenetv2_100_64x192_fp16.onnx"]
    fp16 = written[1]
    assert read_onnx_metadata(fp16).precision == "fp16"
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(float)"]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(fp16)).graph.initializer)
    image = smooth_random_image(SIZE, 3)
    want, got = depth_of(written[0], image), depth_of(fp16, image)
    assert np.median(np.abs(got - want) / want) < 0.01


def test_int8_dynamic_model_runs_at_two_sizes(tmp_path, calib_dir):
    written = run_export(
        None, out=tmp_path, arch="resnet18", random_init=True, size=(60, 180), dynamic=True, int8=True,
        calib=calib_dir, calib_method="entropy",
    )  # fmt: skip
    assert [p.name for p in written] == ["resnet18_dynamic.onnx", "resnet18_dynamic_int8.onnx"]
    meta = read_onnx_metadata(written[1])
    assert meta.dynamic and meta.precision == "int8"
    for size in [(64, 192), (96, 256)]:
        depth = depth_of(written[1], smooth_random_image(size, 1), size=size)
        assert depth.shape == size and np.isfinite(depth).all()


def test_the_head_can_stay_in_float(tmp_path, tiny_config, calib_dir):
    fp32 = run_export(None, out=tmp_path, random_init=True, config=tiny_config, size=SIZE)[0]
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(calib_dir.glob("*.png"))]
    whole = quantize_int8(fp32, tmp_path / "whole.onnx", images, "minmax")
    kept = quantize_int8(fp32, tmp_path / "kept.onnx", images, "percentile", keep_float=(HEAD_NODES,))

    def logits_weights_are_int8(path: Path) -> bool:
        graph = onnx.load(str(path)).graph
        producers = {output: node for node in graph.node for output in node.output}
        logits = next(n for n in graph.node if n.name.startswith(HEAD_NODES) and n.op_type == "Conv")
        return logits.input[1] in producers and producers[logits.input[1]].op_type == "DequantizeLinear"

    assert logits_weights_are_int8(whole) and not logits_weights_are_int8(kept)
    with pytest.raises(UserError, match="unknown method 'kl'"):
        quantize_int8(fp32, tmp_path / "x.onnx", images, "kl")
    with pytest.raises(UserError, match="no usable images"):
        quantize_int8(fp32, tmp_path / "x.onnx", [], "minmax")


def test_deploy_recipe_builds_from_its_config(tmp_path, capsys):
    written = run_export(None, out=tmp_path, random_init=True, config=REPO / "config" / "deploy-cpu.yaml", size=SIZE)
    meta = read_onnx_metadata(written[0])
    recipe = yaml.safe_load((REPO / "config" / "deploy-cpu.yaml").read_text())["model"]
    assert (meta.arch, meta.bins, meta.random_init, meta.precision) == (recipe["arch"], recipe["bins"], True, "fp32")
    capsys.readouterr()
    run_bench(written[0], backend="onnxruntime-cpu", runs=1)
    assert "input 64x192, fp32, random-init weights" in capsys.readouterr().out


def test_depth_error_report_in_metres_and_relative(tmp_path):
    reference = ramp_model(tmp_path / "a.onnx", size=SIZE, offset=1.0)
    shifted = ramp_model(tmp_path / "b.onnx", size=SIZE, offset=1.1)  # 0.1 m deeper everywhere
    meta = read_onnx_metadata(reference)
    images = image_feeds(meta.mean, meta.std, SIZE, None)
    error = compare_precision(reference, shifted, images)
    assert error.median_abs_m == pytest.approx(0.1, abs=1e-5) and error.samples == 3
    assert 0.1 / 2.0 < error.median_rel < 0.1 / 1.0 and error.p95_rel >= error.median_rel
    assert compare_precision(reference, reference, images).median_abs_m == 0
    assert "median |Δdepth| 0.1000 m" in str(error)


def test_precision_path_names_the_precision():
    fp32 = Path("models/efficientnet_b0_352x1216.onnx")
    assert precision_path(fp32, "int8") == Path("models/efficientnet_b0_352x1216_int8.onnx")
