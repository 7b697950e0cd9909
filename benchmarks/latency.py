"""Latency of students and teachers as the depth node runs them: export to ONNX, then `DepthEngine.infer` end to end.

For every model and size: a random-init export (weights do not change the speed), warm-up, then median and p90 of
the total (preprocess + inference + postprocess) per backend, single-stream throughput, parameters and GFLOPs
(`distill.models.info`). Prints one table and the student/teacher speed-ups, and writes benchmarks/results/latency.json.

    python benchmarks/latency.py                                  # all students + the ViT-S teacher, 2 sizes
    python benchmarks/latency.py --models efficientnet_b0 --sizes 176x608 --runs 50
Students use the CPU-friendly head given by --decoder-width/--bins (the trained-default head is 128/256).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from distill.models.info import count_flops, count_parameters
from distill.models.student import STUDENT_ARCHS
from distill.parsing import parse_size
from distill.verbs.bench import Latency, bench_engine, format_table, open_for_bench
from distill.verbs.export import export_onnx

DEFAULT_STUDENTS = ("efficientnet_b0", "efficientnet_b3", "resnet18", "resnet50", "mobilenetv2_100", "ghostnet_100")
DEFAULT_TEACHERS = ("timm:vit_small_patch16_224",)
RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
NOTE = (
    "median_ms/p90_ms are wall-clock per frame (preprocess + inference + postprocess) and grow with the machine's "
    "load (see load_average_*); cpu_median_ms is this process's CPU time per frame summed over its threads, close to "
    "the work an idle machine does (idle latency with N threads is roughly cpu_median_ms / N)"
)


def build(name: str, size: tuple[int, int], decoder_width: int, bins: int) -> torch.nn.Module:
    """A random-init student (CPU head) or teacher (its default head) in eval mode."""
    from distill.models import load_model

    if ":" in name:
        teacher = load_model(name, img_size=size).model
        divisor = teacher.size_divisor  # the export pads to it: build the position embeddings for the padded grid
        padded = tuple(-(-side // divisor) * divisor for side in size)
        return teacher if padded == tuple(size) else load_model(name, img_size=padded).model
    if name not in STUDENT_ARCHS:
        raise SystemExit(f"unknown model {name!r}: a student arch ({', '.join(STUDENT_ARCHS)}) or a teacher spec")
    return load_model(name, decoder_width=decoder_width, bins=bins).model


def bench_model(name: str, size, args, workdir: Path) -> list[dict]:
    """Rows (one per backend) for one model at one size."""
    model = build(name, size, args.decoder_width, args.bins)
    with torch.no_grad():
        params_m, gflops = count_parameters(model) / 1e6, count_flops(model, size)
    out = workdir / f"{name.replace(':', '_')}_{size[0]}x{size[1]}"
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, _ = export_onnx(model, out, size, dynamic=False, opset=17, config={"bench": name})
    del model
    runs = args.teacher_runs if ":" in name else args.runs
    rows = []
    for backend in args.backends:
        engine, image_size = open_for_bench(onnx_path, backend, size, threads=args.threads)
        result: Latency = bench_engine(engine, name, image_size, runs)
        rows.append({**asdict(result), "size": list(size), "params_m": params_m, "gflops": gflops})
        print(format_table([result]).splitlines()[-1], flush=True)
    return rows


def speedups(rows: list[dict]) -> list[str]:
    """ "student vs teacher at HxW: N x" lines, per backend and size."""
    lines = []
    for teacher in (r for r in rows if ":" in r["model"]):
        for student in (r for r in rows if ":" not in r["model"]):
            if student["size"] == teacher["size"] and student["backend"] == teacher["backend"]:
                ratio = teacher["median_ms"] / student["median_ms"]
                hw = f"{student['size'][0]}x{student['size'][1]}"
                lines.append(f"{student['model']} vs {teacher['model']} at {hw}: {ratio:.1f}x faster")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_STUDENTS + DEFAULT_TEACHERS))
    parser.add_argument("--sizes", default="352x1216,176x608", help="comma-separated HEIGHTxWIDTH")
    parser.add_argument("--backends", default="onnxruntime", help="comma-separated (see depth_node.engine.BACKENDS)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per student")
    parser.add_argument("--teacher-runs", type=int, default=5, help="timed runs per teacher")
    parser.add_argument("--decoder-width", type=int, default=32, help="student decoder width")
    parser.add_argument("--bins", type=int, default=64, help="student depth bins")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.backends = args.backends.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))  # exports and FLOP counting only
    load_before = os.getloadavg()
    rows: list[dict] = []
    failed: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="depthkd-latency-") as workdir:
        for size in (parse_size(text) for text in args.sizes.split(",")):
            for name in args.models.split(","):
                try:
                    rows.extend(bench_model(name, size, args, Path(workdir)))
                except Exception as error:  # one model that cannot export must not lose the others' figures
                    failed.append({"model": name, "size": list(size), "error": str(error).splitlines()[0]})
                    print(f"{name} at {size[0]}x{size[1]} failed: {failed[-1]['error']}", flush=True)
    print(format_table([Latency(**{k: r[k] for k in Latency.__dataclass_fields__}) for r in rows]))
    for line in speedups(rows):
        print(line)
    machine = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "load_average_before": load_before, "load_average_after": os.getloadavg()}  # fmt: skip
    settings = {"threads": args.threads, "student_decoder_width": args.decoder_width, "student_bins": args.bins}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "settings": settings, "note": NOTE, "rows": rows, "failed": failed}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
