"""`distill export` and `distill bench`: every student round-trips PyTorch -> ONNX -> ONNX Runtime at a tiny size,
with its metadata read back by the torch-free runtime; bad input gives one clear error each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from depth_node.engine import ModelLoadError, open_engine, plan_input, preprocess
from depth_node.metadata import read_onnx_metadata
from distill.checkpoint import save_checkpoint
from distill.cli import main
from distill.errors import UserError
from distill.models import build_student
from distill.verbs.bench import run_bench
from distill.verbs.export import config_hash, export_onnx, run_export
from distill.verbs.parity import relative_error, smooth_random_image

SIZE = (64, 192)
FAST_ARCHS = ["efficientnet_b0", "resnet18", "mobilenetv2_100"]
SLOW_ARCHS = ["efficientnet_b3", "resnet50", "ghostnet_100"]
REPO = Path(__file__).resolve().parents[1]
RANDOM = ["export", "--arch", "resnet18", "--random-init", "--out", "{tmp}"]


def tiny_student(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(arch, decoder_width=16, bins=16).eval()


def assert_round_trip(model, path: Path, size: tuple[int, int]) -> None:
    """The runtime on an image of the model's input size gives PyTorch's depth and confidence (rel. err <= 1e-3)."""
    engine = open_engine(
        path, backend="onnxruntime-cpu", input_size=None if read_onnx_metadata(path).input_size else size
    )
    image = smooth_random_image(size, seed=7)
    result = engine.infer(image)
    batch = preprocess(image, plan_input(size, size, "stretch"), model.mean, model.std)
    with torch.no_grad():
        out = model(torch.from_numpy(batch))
    expected_depth = out.depth[0, 0].clamp(model.min_depth, model.max_depth).numpy()
    assert result.depth.shape == size
    assert relative_error(result.depth, expected_depth) <= 1e-3
    expected_confidence = torch.nn.functional.interpolate(
        out.probs.amax(1, keepdim=True), size=size, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    assert relative_error(result.confidence, expected_confidence) <= 1e-3


def round_trip(arch: str, tmp_path: Path) -> None:
    model = tiny_student(arch)
    path, metadata = export_onnx(model, tmp_path, SIZE, dynamic=False, opset=17, config={"arch": arch})
    read = read_onnx_metadata(path)
    assert read == metadata
    assert (read.arch, read.input_size, read.bins, read.outputs) == (arch, SIZE, 16, ("depth", "confidence"))
    assert (read.mean, read.std, read.output_kind, read.depth_units) == (model.mean, model.std, "metric", "m")
    assert read.config_hash == config_hash({"arch": arch})
    assert_round_trip(model, path, SIZE)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_student_round_trip(arch, tmp_path):
    round_trip(arch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW_ARCHS)
def test_student_round_trip_heavy(arch, tmp_path):
    round_trip(arch, tmp_path)


@pytest.mark.slow
def test_dynamic_export_runs_at_two_sizes(tmp_path):
    model = tiny_student("resnet18")
    path, metadata = export_onnx(model, tmp_path, SIZE, dynamic=True, opset=17, config={})
    assert metadata.dynamic and metadata.input_size is None and path.name == "resnet18_dynamic.onnx"
    for size in [SIZE, (96, 256)]:
        assert_round_trip(model, path, size)


@pytest.mark.slow
def test_size_off_the_divisor_is_padded_inside_the_graph(tmp_path):
    model = tiny_student("resnet18")
    path, _ = export_onnx(model, tmp_path, (80, 200), dynamic=False, opset=17, config={})
    result = open_engine(path, backend="onnxruntime-cpu").infer(smooth_random_image((80, 200), 1))
    assert result.depth.shape == (80, 200) and np.isfinite(result.depth).all()


def test_cli_export_of_a_checkpoint_prints_how_to_run_it(tmp_path, capsys):
    model = tiny_student("resnet18", seed=3)
    config = {"model": model.spec, "run": {"name": "tiny"}}
    checkpoint = save_checkpoint(tmp_path / "run" / "best", model, {"config": config, "step": 1})
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--size", "64x192"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "out" / "resnet18_64x192.onnx"
    assert "max relative error" in printed and f"model:={path.resolve()}" in printed
    assert "ros2 launch depth_node kitti.launch.py" in printed
    assert read_onnx_metadata(path).config_hash == config_hash(config)
    assert_round_trip(model, path, SIZE)  # the checkpoint's weights, not a fresh init


@pytest.mark.slow
def test_random_init_export_through_the_cli(tmp_path):
    code = main(["export", "--arch", "resnet18", "--random-init", "--out", str(tmp_path), "--size", "64x192"])
    assert code == 0 and read_onnx_metadata(tmp_path / "resnet18_64x192.onnx").arch == "resnet18"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "missing_ckpt", "--out", "{tmp}"], "checkpoint not found: missing_ckpt"),
        ([*RANDOM, "--format", "onnx,tflite"], "unknown format tflite"),
        (["export", "{tmp}/notes.onnx", "--out", "{tmp}", "--format", "engine"], "not a readable ONNX model"),
        (["export", "--random-init", "--out", "{tmp}"], "--random-init needs --arch"),
        (
            ["export", "--arch", "resnet18", "--random-init", "--out", "{tmp}", "--int8", "--format", "engine"],
            "--calib",
        ),
        ([*RANDOM, "--int8"], "--int8 needs --calib DATA"),
        ([*RANDOM, "--fp16", "--int8", "--calib", "{tmp}"], "--fp16 and --int8 exclude each other"),
        ([*RANDOM, "--calib-method", "entropy"], "add --int8"),
        ([*RANDOM, "--config", "config/deploy-cpu.yaml"], "give either --arch resnet18 or --config"),
        (["export", "--config", "config/deploy-cpu.yaml", "--out", "{tmp}"], "add --random-init"),
        (["export", "--random-init", "--config", "{tmp}/none.yaml", "--out", "{tmp}"], "none.yaml not found"),
        (["export", "--arch", "resnet_18", "--random-init", "--out", "{tmp}"], "did you mean"),
        (["bench", "{tmp}/notes.onnx"], "not a readable ONNX model"),
        (["bench", "{tmp}/none.onnx"], "model file not found"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, argv, message):
    (tmp_path / "notes.onnx").write_text("not a model")
    assert main([part.replace("{tmp}", str(tmp_path)) for part in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_dynamic_export_takes_a_size_off_the_divisor(tmp_path, capsys):
    argv = [*(part.replace("{tmp}", str(tmp_path)) for part in RANDOM), "--dynamic", "--size", "80x200"]
    code = main(argv)
    assert code == 0 and "traced at 96x224" in capsys.readouterr().out
    assert read_onnx_metadata(tmp_path / "resnet18_dynamic.onnx").dynamic


def test_second_export_of_the_same_name_needs_force(tmp_path, capsys):
    argv = [*(part.replace("{tmp}", str(tmp_path)) for part in RANDOM), "--size", "64x192"]
    assert main(argv) == 0
    first = (tmp_path / "resnet18_64x192.onnx").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "resnet18_64x192.onnx exists" in err and "--force" in err and len(err.splitlines()) == 1
    assert (tmp_path / "resnet18_64x192.onnx").stat().st_mtime_ns == first
    assert main([*argv, "--force"]) == 0


def test_teacher_at_another_size_than_built_is_one_line(tmp_path):
    from distill.models import load_model

    teacher, _ = load_model("timm:vit_tiny_patch16_224", img_size=(64, 192))
    with pytest.raises(UserError) as info:
        export_onnx(teacher, tmp_path, (96, 192), dynamic=False, opset=17, config={})
    assert "built for 64x192" in str(info.value) and "--size 64x192" in str(info.value)
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="without --dynamic, with --size 64x192"):
        export_onnx(teacher, tmp_path, (64, 192), dynamic=True, opset=17, config={})
    path, _ = export_onnx(teacher, tmp_path, (64, 192), dynamic=False, opset=17, config={})
    assert read_onnx_metadata(path).input_size == (64, 192)


def test_completion_network_exports_with_its_extra_inputs(tmp_path):
    from depth_node.completion import COMPLETION_INPUTS, CompletionRunner
    from distill.models.completion import CompletionNet

    torch.manual_seed(0)
    network = CompletionNet(widths=(8, 8, 8, 8), max_depth=80.0).eval()
    torch.nn.init.normal_(network.head.weight, std=0.1)  # an untrained head outputs the aligned input unchanged
    checkpoint = save_checkpoint(tmp_path / "run" / "last", network, {"config": {"kd": "completion"}})
    assert main(["export", str(checkpoint), "--out", str(tmp_path), "--size", "64x192"]) == 0
    path = tmp_path / "completion_64x192.onnx"
    assert [i.name for i in onnx.load(str(path)).graph.input] == list(COMPLETION_INPUTS)
    rgb, aligned = smooth_random_image(SIZE, 0), np.full(SIZE, 20.0, np.float32)
    sparse = np.zeros(SIZE, np.float32)
    sparse[::8, ::8] = 25.0
    depth = CompletionRunner(path).complete(rgb, aligned, sparse)
    assert depth.shape == SIZE and np.isfinite(depth).all() and not np.allclose(depth, 20.0)
    with pytest.raises(ModelLoadError, match="expected inputs \\['image'\\]"):
        open_engine(path)  # not an image-only depth model: one clear error


@pytest.mark.slow
def test_bench_reports_latency(tmp_path, capsys):
    path, _ = export_onnx(tiny_student("resnet18"), tmp_path, SIZE, dynamic=False, opset=17, config={})
    row = run_bench(path, backend="onnxruntime-cpu", runs=3)
    assert row["size"] == SIZE and 0 < row["median_ms"] <= row["p90_ms"] and row["throughput_fps"] > 0
    out = capsys.readouterr().out
    assert row["backend"] == "onnxruntime[CPUExecutionProvider]" and "median ms" in out
    assert "metric depth (m)" in out and "16 bins" in out and "input 64x192" in out
    dynamic, _ = export_onnx(tiny_student("resnet18"), tmp_path, SIZE, dynamic=True, opset=17, config={})
    with pytest.raises(UserError, match="dynamic input size: pass --size"):
        run_bench(dynamic, runs=1)
    assert run_bench(dynamic, size=(64, 128), runs=1)["size"] == (64, 128)


def test_run_export_returns_the_written_files(tmp_path):
    written = run_export(None, out=tmp_path, arch="resnet18", random_init=True, size=SIZE, dynamic=True)
    assert written == [tmp_path / "resnet18_dynamic.onnx"]


@pytest.mark.slow
def test_latency_benchmark_times_the_deploy_student_against_depth_anything_and_profiles_it(tmp_path):
    out = tmp_path / "latency.json"
    argv = ["--size", "64x192", "--reference-size", "70x196", "--camera-size", "75x250", "--students", ""]
    argv += ["--teachers", "timm:vit_tiny_patch16_224"]
    argv += ["--rounds", "1", "--student-repeats", "2", "--profile-runs", "1", "--threads", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "latency.py"), *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(row["model"], row["precision"], row["size"], row["runs"]) for row in rows] == [
        ("depth-anything-v2-small", "fp32", [70, 196], 1),
        ("timm:vit_tiny_patch16_224", "fp32", [64, 192], 1),
        ("mobilenetv2_100", "fp32", [64, 192], 2),  # config/deploy-cpu.yaml's student
        ("mobilenetv2_100", "int8", [64, 192], 2),
    ]
    assert rows[0]["params_m"] == pytest.approx(24.8, abs=0.05) and rows[0]["ratio_vs_reference"] == 1.0
    for row in rows:
        assert 0 < row["inference_median_ms"] < row["median_ms"] and row["preprocess_median_ms"] > 0
        assert row["ratio_vs_reference"] == pytest.approx(rows[0]["median_ms"] / row["median_ms"])
    assert set(report["columns"]) >= {"median_ms", "ratio_vs_reference"} and "load_average_after" in report["machine"]
    profile = report["deploy_profile"]
    assert profile["model"] == "mobilenetv2_100" and set(profile["engine_ms"]) == {"fp32", "int8"}
    for found in profile["by_precision"].values():
        assert {"encoder", "decoder", "bins heads"} <= set(found["groups_ms"])
        assert found["kernel_ms"] == pytest.approx(sum(found["groups_ms"].values()))
    assert "x faster" in done.stdout
