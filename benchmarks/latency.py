"""Latency of the deploy student against what users would run instead, side by side in one run, and where its time goes.

Models (all random-init: weights do not change the speed), exported with `distill export`'s exporter (opset 17,
TorchScript exporter, dynamo=False) and run by the node's `DepthEngine` on ONNX Runtime CPU with --threads threads:
  - Depth Anything V2 Small: `transformers`' default `DepthAnythingConfig` (24.8 M parameters) through the `hf:`
    teacher scheme, at --reference-size (multiples of its 14-pixel patch; 364x1232, the size it is compared at
    against students at 352x1216);
  - our transformer teachers (timm ViT/Swin built through `distill.models`), at --size padded to their divisor;
  - the students: the one --config's `model:` section describes (the deploy student) and --students (same head),
    per precision: fp32 and int8 (`distill.verbs.quantize.quantize_int8`, as `distill export --int8`, calibrated on
    --calib or smooth random images). FP16 (`distill export --fp16`) is for GPU execution providers (CUDA,
    TensorRT) and is not timed here: on x86 CPUs ONNX Runtime runs most FP16 ops through casts to float32.
Every frame is a --camera-size RGB image (KITTI's 375x1242), so each model resizes it to its input and its outputs
back (preprocess / postprocess) as the node does. Rounds are interleaved: each round runs every model (students
--student-repeats times), so a load spike slows all of them alike and the ratios to Depth Anything V2 Small hold on a
noisy machine. The deploy student is then profiled: ONNX Runtime's per-node kernel times grouped by the node names'
prefixes (encoder, decoder, bins heads, depth output, export wrapper, ONNX Runtime's layout changes) beside the
engine's preprocess/postprocess. Writes benchmarks/results/latency.json.

    python benchmarks/latency.py --rounds 6                                 # ~10 min on the loaded 2-core machine
    python benchmarks/latency.py --teachers '' --students '' --rounds 2     # DA V2 Small vs the deploy student
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError
from distill.models.info import count_parameters
from distill.parsing import parse_size
from distill.verbs.bench import measure, open_for_bench
from distill.verbs.export import export_onnx, load_for_export
from distill.verbs.parity import PARITY_TOLERANCE, smooth_random_image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "latency.json"
REFERENCE = "depth-anything-v2-small"
DEFAULT_TEACHERS = ("timm:vit_small_patch16_224", "timm:swin_tiny_patch4_window7_224")
# The deploy student's rivals after INT8 with its head: B0 (SiLU) and the other registered ReLU-family encoders.
DEFAULT_STUDENTS = ("efficientnet_b0", "mobilenetv3_large_100", "ghostnet_100", "resnet18")
PRECISIONS = ("fp32", "int8")
CALIB_IMAGES = 16
COLUMNS = {
    "median_ms": "wall-clock ms per frame, DepthEngine.infer end to end (preprocess + inference + postprocess)",
    "p90_ms": "90th percentile of the same",
    "inference_median_ms": "ms in the ONNX Runtime session alone",
    "preprocess_median_ms": "ms resizing the camera frame to the network input and normalising it",
    "postprocess_median_ms": "ms resizing the outputs back to the camera frame and clamping",
    "cpu_median_ms": "this process's CPU time per frame summed over its threads (close to an idle machine's work)",
    "ratio_vs_reference": "Depth Anything V2 Small's median_ms / this row's (same rounds), i.e. x faster",
    "inference_ratio_vs_reference": "the same ratio of inference_median_ms",
    "runs": "timed frames (interleaved rounds x repeats)",
}
NOTE = (
    "all rows ran interleaved in one process, so a load spike (see load_average_*) slows every model alike and the "
    "ratios hold better than the absolute ms; profile: ONNX Runtime kernel ms per run of the deploy student, grouped "
    "by node-name prefix (their sum is below the session time: scheduling and memory between kernels)"
)


@dataclass
class Entry:
    """One timed model: its role ("reference", "teacher", "student"), precision and exported file."""

    name: str
    role: str
    precision: str
    size: tuple[int, int]
    path: Path
    params_m: float


def depth_anything_v2_small(workdir: Path):
    """A random-init Depth Anything V2 Small (transformers' default DepthAnythingConfig) as an `hf:` teacher."""
    import transformers

    folder = workdir / REFERENCE
    torch.manual_seed(0)
    transformers.DepthAnythingForDepthEstimation(transformers.DepthAnythingConfig()).save_pretrained(folder)
    return _load(f"hf:{folder}")


def _load(ref, **kwargs):
    """The model `distill.models.load_model` builds from a name, spec or folder (eval mode)."""
    from distill.models import load_model

    return load_model(ref, **kwargs).model


def export_reference(model, workdir: Path, size: tuple[int, int]) -> Path:
    """Export Depth Anything V2 Small. Random-init, its output is ~1e-4 and ReLU-clipped at 0, where float32
    rounding (~1e-9) fails the exporter's per-pixel relative check at the zeros; it is checked instead against the
    output's largest value."""
    try:
        return export_onnx(model, workdir / REFERENCE, size, False, 17, {"bench": REFERENCE})[0]
    except UserError as error:
        found = sorted((workdir / REFERENCE).glob("*.onnx"))  # the exporter keeps the file it checked
        if "disagrees with PyTorch" not in str(error) or not found:
            raise
        path = found[0]
    import onnxruntime as ort

    from distill.verbs.export import ExportWrapper
    from distill.verbs.parity import parity_inputs

    sample = parity_inputs(model, size, None)[0]
    with torch.no_grad():
        expected = ExportWrapper(model).eval()(torch.from_numpy(sample["image"])).numpy()
    actual = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, sample)[0]
    error = float(np.abs(actual - expected).max() / np.abs(expected).max())
    print(f"{REFERENCE}: ONNX Runtime vs PyTorch max error {error:.1e} of the largest depth", flush=True)
    if not error <= PARITY_TOLERANCE:
        raise UserError(f"{path}: ONNX Runtime disagrees with PyTorch ({error:.1e} of the largest depth)")
    return path


def teacher(spec: str, size: tuple[int, int]):
    """A random-init teacher built for `size` padded to its divisor (the export pads the input to it)."""
    built = _load(spec, img_size=size)
    divisor = built.size_divisor
    padded = tuple(-(-side // divisor) * divisor for side in size)
    return built if padded == tuple(size) else _load(spec, img_size=padded)


def student(arch: str | None, config: Path):
    """The deploy student of `config`'s model: section, or `arch` with that section's head."""
    model, _ = load_for_export(None, random_init=True, config=config)
    if arch is None or arch == model.spec["arch"]:
        return model
    return _load({**model.spec, "arch": arch})


def calibration(args) -> list[np.ndarray]:
    """(H, W, 3) uint8 calibration images: --calib's, else smooth random images at the camera size."""
    if args.calib is not None:
        from distill.verbs.calibration import calibration_images

        return [image for image, _ in zip(calibration_images(args.calib), range(CALIB_IMAGES))]
    return [smooth_random_image(args.camera_size, seed) for seed in range(CALIB_IMAGES)]


def export_all(args, workdir: Path) -> list[Entry]:
    """Export every model (and the students' INT8 versions); returns them in timing order."""
    from distill.verbs.quantize import precision_path, quantize_int8

    entries = []
    reference_size = args.reference_size
    if any(side % 14 for side in reference_size):
        raise UserError(f"--reference-size {reference_size[0]}x{reference_size[1]}: sides must be multiples of 14")
    model = depth_anything_v2_small(workdir)
    path = export_reference(model, workdir, reference_size)
    entries.append(Entry(REFERENCE, "reference", "fp32", reference_size, path, count_parameters(model) / 1e6))
    for spec in args.teachers:
        model = teacher(spec, args.size)
        path = export_onnx(model, workdir / spec.replace(":", "_"), args.size, False, 17, {"bench": spec})[0]
        entries.append(Entry(spec, "teacher", "fp32", args.size, path, count_parameters(model) / 1e6))
    images = calibration(args)
    for arch in [None, *args.students]:
        model = student(arch, args.config)
        name = model.spec["arch"]
        fp32 = export_onnx(model, workdir / name, args.size, False, 17, {"bench": name})[0]
        params = count_parameters(model) / 1e6
        entries.append(Entry(name, "student", "fp32", args.size, fp32, params))
        if "int8" in args.precisions:
            int8 = quantize_int8(fp32, precision_path(fp32, "int8"), images)
            entries.append(Entry(name, "student", "int8", args.size, int8, params))
        print(f"exported {name} ({', '.join(args.precisions)})", flush=True)
    return entries


def time_interleaved(entries: list[Entry], args) -> list[dict]:
    """Rows of per-frame statistics; every round runs each model once (students `student_repeats` times)."""
    engines = [open_for_bench(entry.path, "onnxruntime-cpu", entry.size, threads=args.threads)[0] for entry in entries]
    for engine in engines:
        measure(engine, args.camera_size, runs=1, warmup=2)
    times = [collections.defaultdict(list) for _ in entries]
    for round_index in range(args.rounds):
        for entry, engine, series in zip(entries, engines, times):
            repeats = args.student_repeats if entry.role == "student" else 1
            for stage, values in measure(engine, args.camera_size, runs=repeats, warmup=0).items():
                series[stage].extend(values)
        print(f"round {round_index + 1}/{args.rounds}", flush=True)
    rows = []
    for entry, series in zip(entries, times):
        median = {stage: float(np.median(values)) for stage, values in series.items()}
        rows.append({"model": entry.name, "role": entry.role, "precision": entry.precision,
                     "size": list(entry.size), "params_m": entry.params_m,
                     "median_ms": median["total"], "p90_ms": float(np.percentile(series["total"], 90)),
                     "inference_median_ms": median["inference"], "preprocess_median_ms": median["preprocess"],
                     "postprocess_median_ms": median["postprocess"], "cpu_median_ms": median["cpu"],
                     "runs": len(series["total"])})  # fmt: skip
    reference = rows[0]
    for row in rows:
        row["ratio_vs_reference"] = reference["median_ms"] / row["median_ms"]
        row["inference_ratio_vs_reference"] = reference["inference_median_ms"] / row["inference_median_ms"]
    return rows


def node_group(name: str) -> str:
    """The part of the student a node of a `distill export` graph belongs to, from its name."""
    name = name.removeprefix("fused ")
    for prefix, group in (("/model/encoder/", "encoder"), ("/model/head/decoder/", "decoder"),
                          ("/model/head/bins/", "bins heads"), ("/model/head/", "depth output")):  # fmt: skip
        if name.startswith(prefix):
            return group
    if name.startswith("/") or name.startswith("image_"):
        return "export wrapper"  # the confidence map (max probability, upsampled) and the input's quantization
    return "layout changes"  # nodes ONNX Runtime inserted (Reorder*, Transpose_token_*), named after no layer


def profile(path: Path, size: tuple[int, int], threads: int, runs: int) -> dict:
    """ONNX Runtime kernel ms per run of one model, grouped by `node_group`, with the session's own ms per run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the node's OrtRunner
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="depthkd-profile-") as scratch:
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"image": np.zeros((1, 3, *size), np.float32)}
        session.run(None, feed)  # warm-up, not counted
        started = len(_kernel_events(session.end_profiling()))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        wall = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            wall.append((time.perf_counter() - start) * 1e3)
        events = _kernel_events(session.end_profiling())[started:]
    groups: dict[str, float] = collections.Counter()
    for event in events:
        groups[node_group(event["name"].removesuffix("_kernel_time"))] += event["dur"] / 1e3 / runs
    kernels = sum(groups.values())
    return {"session_median_ms": float(np.median(wall)), "kernel_ms": kernels,
            "groups_ms": dict(sorted(groups.items(), key=lambda item: -item[1])),
            "groups_share": {group: ms / kernels for group, ms in groups.items()}}  # fmt: skip


def _kernel_events(profile_file: str) -> list[dict]:
    events = json.loads(Path(profile_file).read_text())
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def machine_state(load_before: tuple) -> dict:
    """The machine and its load average (1, 5, 15 min) before and after the run."""
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}  # fmt: skip


def settings(args, entries: list[Entry]) -> dict:
    config = args.config.resolve()
    return {"threads": args.threads, "camera_size": list(args.camera_size), "student_size": list(args.size),
            "reference_size": list(entries[0].size), "rounds": args.rounds, "student_repeats": args.student_repeats,
            "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
            "calibration": str(args.calib) if args.calib else "smooth random images",
            "fp16": "not timed: for GPU execution providers (CUDA, TensorRT)"}  # fmt: skip


def deploy_profile(args, deploy: list[Entry], rows: list[dict], profiles: dict) -> dict:
    """The deploy student's profile per precision beside its engine stages (median ms of the timed rounds)."""
    stages = ("preprocess", "inference", "postprocess")
    engine = {row["precision"]: {stage: row[f"{stage}_median_ms"] for stage in stages}
              for row in rows if row["role"] == "student" and row["model"] == deploy[0].name}  # fmt: skip
    return {
        "model": deploy[0].name,
        "size": list(args.size),
        "runs": args.profile_runs,
        "by_precision": profiles,
        "engine_ms": engine,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "deploy-cpu.yaml", help="the deploy student")
    parser.add_argument("--students", default=",".join(DEFAULT_STUDENTS), help="more archs with the config's head")
    parser.add_argument("--teachers", default=",".join(DEFAULT_TEACHERS), help="comma-separated teacher specs")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="student precisions: fp32,int8")
    parser.add_argument("--size", type=parse_size, default=(352, 1216), help="student/teacher input HxW")
    parser.add_argument("--reference-size", type=parse_size, default=(364, 1232), help="Depth Anything V2 HxW")
    parser.add_argument("--camera-size", type=parse_size, default=(375, 1242), help="HxW of the timed frames")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--student-repeats", type=int, default=3, help="student frames per round")
    parser.add_argument("--profile-runs", type=int, default=10, help="profiled runs of the deploy student")
    parser.add_argument("--calib", type=Path, default=None, help="INT8 calibration images (default: smooth noise)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.students = [name for name in args.students.split(",") if name]
    args.teachers = [name for name in args.teachers.split(",") if name]
    args.precisions = [name for name in args.precisions.split(",") if name]
    if not set(args.precisions) <= set(PRECISIONS):
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)} (fp16 is for GPU execution providers)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))  # exports only
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="depthkd-latency-") as workdir:
        entries = export_all(args, Path(workdir))
        rows = time_interleaved(entries, args)
        deploy = [entry for entry in entries if entry.role == "student"][: len(args.precisions)]  # --config's
        profiles = {entry.precision: profile(entry.path, entry.size, args.threads, args.profile_runs)
                    for entry in deploy}  # fmt: skip
    print(f"{'model':<36} {'prec':<5} {'HxW':>9} {'median ms':>9} {'infer ms':>8} {'pre ms':>6} {'post ms':>7} "
          f"{'x faster':>8}")  # fmt: skip
    for row in rows:
        hw = f"{row['size'][0]}x{row['size'][1]}"
        print(f"{row['model']:<36} {row['precision']:<5} {hw:>9} {row['median_ms']:>9.1f} "
              f"{row['inference_median_ms']:>8.1f} {row['preprocess_median_ms']:>6.1f} "
              f"{row['postprocess_median_ms']:>7.1f} {row['ratio_vs_reference']:>8.1f}")  # fmt: skip
    for precision, found in profiles.items():
        parts = ", ".join(f"{group} {ms:.1f}" for group, ms in found["groups_ms"].items())
        print(f"profile {deploy[0].name} {precision}: session {found['session_median_ms']:.1f} ms; kernels {parts}")
    report = {"machine": machine_state(load_before), "settings": settings(args, entries), "columns": COLUMNS,
              "note": NOTE, "rows": rows, "deploy_profile": deploy_profile(args, deploy, rows, profiles)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
