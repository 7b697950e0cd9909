"""`distill bench MODEL`: end-to-end latency of an exported model on one backend, as the depth node runs it.

Each run is one `DepthEngine.infer` on a camera-sized RGB image (preprocess + inference + postprocess); after
warm-up runs, the median and 90th percentile of the total and of the inference stage alone are reported, with the
single-stream throughput (1000 / median ms).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from depth_node.engine import DepthEngine, ModelLoadError, open_engine
from depth_node.metadata import ModelMetadata
from distill.errors import UserError

WARMUP_RUNS = 3


@dataclass
class Latency:
    """Latency of one model on one backend at one image size (milliseconds unless said otherwise)."""

    model: str
    backend: str
    size: tuple[int, int]
    median_ms: float
    p90_ms: float
    inference_median_ms: float
    cpu_median_ms: float
    throughput_fps: float
    runs: int


def summarise(totals_ms: list[float]) -> tuple[float, float]:
    """(median, p90) of per-run latencies."""
    values = np.asarray(totals_ms, np.float64)
    return float(np.median(values)), float(np.percentile(values, 90))


def measure(engine: DepthEngine, size: tuple[int, int], runs: int, warmup: int = WARMUP_RUNS) -> dict[str, list[float]]:
    """Per-run milliseconds of `runs` inferences on an (H, W) = size image: "total" wall time, "cpu" time of this
    process summed over its threads (on a shared machine, a lower bound on the idle latency times the thread count),
    and each engine stage."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    for _ in range(warmup):
        engine.infer(image)
    times: dict[str, list[float]] = {"total": [], "cpu": []}
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = engine.infer(image)
        times["total"].append((time.perf_counter() - start) * 1e3)
        times["cpu"].append((time.process_time() - cpu_start) * 1e3)
        for stage, ms in result.timings.items():
            times.setdefault(stage, []).append(ms)
    return times


def bench_engine(engine: DepthEngine, name: str, size: tuple[int, int], runs: int) -> Latency:
    """Measure an open engine; see `measure`."""
    if runs < 1:
        raise UserError(f"--runs must be >= 1, got {runs}")
    times = measure(engine, size, runs)
    median, p90 = summarise(times["total"])
    inference, cpu = summarise(times["inference"])[0], summarise(times["cpu"])[0]
    return Latency(name, engine.backend_name, tuple(size), median, p90, inference, cpu, 1000.0 / median, runs)


def open_for_bench(model: Path, backend: str, size: tuple[int, int] | None, threads: int | None = None):
    """(engine, image size): the model's own input size unless `size` is given (required for dynamic models)."""
    model = Path(model)
    try:
        engine = open_engine(model, backend=backend, threads=threads)
    except (ModelLoadError, ValueError) as error:
        raise UserError(str(error)) from None
    size = tuple(size) if size is not None else engine.metadata.input_size
    if size is None:
        raise UserError(f"{model} has dynamic input size: pass --size HxW")
    return engine, size


def run_bench(
    model: Path,
    backend: str = "onnxruntime",
    size: tuple[int, int] | None = None,
    runs: int = 50,
    threads: int | None = None,
) -> dict:
    """The `distill bench` verb: print one latency line and return it as a dict (threads None: ORT's default)."""
    engine, size = open_for_bench(model, backend, size, threads)
    print(describe_model(engine.metadata))
    result = bench_engine(engine, Path(model).name, size, runs)
    print(format_table([result]))
    return asdict(result)


def describe_model(metadata: ModelMetadata) -> str:
    """One line on what the model is: its kind (metric or relative, which decides the node's output topic), range,
    bins, input size and precision, from the metadata embedded at export."""
    kind = "metric depth (m)" if metadata.output_kind == "metric" else f"{metadata.output_kind} (unitless)"
    size = "dynamic" if metadata.input_size is None else f"{metadata.input_size[0]}x{metadata.input_size[1]}"
    bins = f"{metadata.bins} bins" if metadata.bins else "no bins"
    weights = ", random-init weights" if metadata.random_init else ""
    return (f"{metadata.arch or 'model'}: {kind}, {metadata.min_depth:g}-{metadata.max_depth:g} m, {bins}, "
            f"input {size}, {metadata.precision}{weights}")  # fmt: skip


def format_table(rows: list[Latency]) -> str:
    """A fixed-width table of latency rows."""
    header = (
        f"{'model':<30} {'backend':<34} {'HxW':>9} {'median ms':>9} {'p90 ms':>8} {'infer ms':>8} {'cpu ms':>8} "
        f"{'fps':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        hw = f"{r.size[0]}x{r.size[1]}"
        lines.append(
            f"{r.model:<30} {r.backend:<34} {hw:>9} {r.median_ms:>9.1f} {r.p90_ms:>8.1f} "
            f"{r.inference_median_ms:>8.1f} {r.cpu_median_ms:>8.1f} {r.throughput_fps:>6.1f}"
        )
    return "\n".join(lines)
