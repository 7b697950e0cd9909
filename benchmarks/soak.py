"""Soak test of the depth node: latency, dropped frames and memory over time, at the camera rate and overloaded.

Starts `depth_node` (the console script, its own process) on an EfficientNet-B0 student exported at 176x608
(random init, decoder 32, 64 bins: `distill export --random-init` cannot set those, so the Python API does it),
publishes KITTI-size (375x1242) rgb8 frames + camera_info from this process for --minutes, receives `/depth` and
the full-resolution `/points` (reliable), then stops the node with SIGINT. The run is split in two phases:

  camera:   --rate-hz (10 Hz, KITTI) for the first half
  overload: --overload-factor x that rate (3x: 30 Hz) for the second half

and reported in --window-s windows (one minute): end-to-end latency percentiles (publish -> both outputs
received), frames published / taken in / out / dropped by keep-latest / lost before the node (the node's counters
come from `diagnostics` every 0.5 s, so a window's counts may be off by a few frames; the totals are exact), the
node's RSS (VmRSS from /proc/<pid>/status, sampled every second) and the load average. Targets: latency bounded
(no overload window's p99 above 2x the first one's, no upward trend) and peak RSS growth < 20 MB after the first
(warm-up) window.
Both processes use FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (large best-effort images are lost over UDP otherwise).

    python benchmarks/soak.py                     # 10 min -> benchmarks/results/soak.json
    python benchmarks/soak.py --minutes 3 --out runs/soak-3min.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from node_latency import HEIGHT, WIDTH, Bench, RssSampler, counters, export_student, wait_for_first_output

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
RSS_TARGET_MB = 20.0


def paced(rate_hz: float, seconds: float):
    """Yield at a fixed rate for `seconds` (late ticks are not made up with bursts)."""
    start, period = time.perf_counter(), 1.0 / rate_hz
    for index in range(int(rate_hz * seconds)):
        time.sleep(max(0.0, start + index * period - time.perf_counter()))
        yield


def run_window(bench: Bench, rss: RssSampler, phase: str, rate_hz: float, seconds: float) -> dict:
    """Publish for one window; what is needed to summarise it once its last outputs are in."""
    before, first_rss, started = counters(bench), len(rss.samples), time.perf_counter()
    stamps = []
    for _ in paced(rate_hz, seconds):
        stamps.append(time.time_ns())
        bench.publish(stamps[-1])
    return {
        "phase": phase,
        "rate_hz": rate_hz,
        "seconds": time.perf_counter() - started,
        "stamps": stamps,
        "counters": (before, counters(bench)),
        "rss": rss.samples[first_rss:] or [float("nan")],
        "load1": os.getloadavg()[0],
    }


def summarise(bench: Bench, window: dict, start_s: float) -> dict:
    """One window's figures (latency in ms, RSS in MB)."""
    before, after = window["counters"]
    delta = {key: after[key] - before[key] for key in after}
    latency = bench.latencies_ms(window["stamps"])
    quantiles = {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    e2e = {name: round(float(np.percentile(latency, q)), 1) for name, q in quantiles.items()} if len(latency) else {}
    return {
        "phase": window["phase"],
        "start_s": round(start_s, 1),
        "rate_hz": window["rate_hz"],
        "published": len(window["stamps"]),
        "frames_in": delta["frames_in"],
        "frames_out": delta["frames_out"],
        "received": len(latency),
        "dropped": delta["dropped"],
        "lost_before_node": len(window["stamps"]) - delta["frames_in"],
        "e2e_ms": e2e,
        "rss_mb": {"median": round(float(np.median(window["rss"])), 1), "max": round(float(max(window["rss"])), 1)},
        "load1": round(window["load1"], 2),
    }


def soak(bench: Bench, rss: RssSampler, args: argparse.Namespace) -> list[dict]:
    """Both phases, window by window; the window summaries."""
    windows = []
    half = args.minutes * 30.0
    for phase, rate in (("camera", args.rate_hz), ("overload", args.overload_factor * args.rate_hz)):
        left = half
        while left > 1.0:
            windows.append(run_window(bench, rss, phase, rate, min(args.window_s, left)))
            left -= windows[-1]["seconds"]
            print(f"{phase} window {len(windows)}: {len(windows[-1]['stamps'])} frames published", flush=True)
    time.sleep(3.0)  # the last outputs and a diagnostics period
    starts = np.cumsum([0.0] + [w["seconds"] for w in windows[:-1]])
    return [summarise(bench, window, start) for window, start in zip(windows, starts)]


def verdict(windows: list[dict]) -> dict:
    """RSS growth after the warm-up window and whether latency stayed bounded.

    RSS is compared by each window's peak: the median swings by ~20 MB from window to window as the allocator
    returns and takes back the 7.5 MB cloud buffers, while a leak would raise the peak steadily.
    """
    after_warmup = windows[1:] or windows
    growth = after_warmup[-1]["rss_mb"]["max"] - after_warmup[0]["rss_mb"]["max"]
    overload = [w for w in windows if w["phase"] == "overload" and "p99" in w["e2e_ms"]]
    p50s = [w["e2e_ms"]["p50"] for w in overload]
    trend = float(np.polyfit(np.arange(len(p50s)), p50s, 1)[0]) if len(p50s) > 1 else 0.0
    bound = 2.0 * overload[0]["e2e_ms"]["p99"] if overload else float("nan")
    return {
        "rss_peak_mb_after_warmup": after_warmup[0]["rss_mb"]["max"],
        "rss_peak_mb_end": after_warmup[-1]["rss_mb"]["max"],
        "rss_growth_after_warmup_mb": round(growth, 1),
        "rss_median_range_mb": [
            min(w["rss_mb"]["median"] for w in windows),
            max(w["rss_mb"]["median"] for w in windows),
        ],
        "rss_ok": bool(growth < RSS_TARGET_MB),
        "camera_p99_ms_max": max(
            (w["e2e_ms"].get("p99", 0.0) for w in windows if w["phase"] == "camera"), default=None
        ),
        "overload_p99_ms_max": max((w["e2e_ms"]["p99"] for w in overload), default=None),
        "overload_p50_trend_ms_per_window": round(trend, 2),
        "latency_bounded": bool(overload and all(w["e2e_ms"]["p99"] <= bound for w in overload)),
        "dropped": sum(w["dropped"] for w in windows),
        "lost_before_node": sum(w["lost_before_node"] for w in windows),
    }


def stop(process: subprocess.Popen) -> dict:
    """SIGINT, as Ctrl-C or `ros2 launch` would: exit code and seconds to exit."""
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    return {"signal": "SIGINT", "exit_code": code, "seconds": round(time.monotonic() - sent, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total: half at the camera rate, half overloaded")
    parser.add_argument("--window-s", type=float, default=60.0, help="report latency, drops and RSS per window")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="camera rate")
    parser.add_argument("--overload-factor", type=float, default=3.0, help="overload rate = factor x camera rate")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads in the node")
    parser.add_argument("--size", default="176x608", help="HEIGHTxWIDTH of the exported student")
    parser.add_argument("--model", type=Path, help="exported model (default: export EfficientNet-B0 at --size)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_start = os.getloadavg()
    size = tuple(int(v) for v in args.size.split("x"))
    model = args.model or export_student(size, Path(tempfile.mkdtemp(prefix="soak_")))
    os.environ.setdefault("ROS_DOMAIN_ID", str(101 + os.getpid() % 100))  # both processes, away from test sessions
    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
    console = Path(sys.executable).parent / "depth_node"
    process = subprocess.Popen([str(console), "--ros-args", "-p", f"model:={model}", "-p", f"threads:={args.threads}",
                                "-p", "max_depth:=80.0", "-p", "diagnostics_period:=0.5"])  # fmt: skip
    bench, rss = Bench(), RssSampler(process.pid)
    try:
        wait_for_first_output(bench, process)
        rss.start()
        windows = soak(bench, rss, args)
    finally:
        rss.stop.set()
        bench.close()
        shutdown = stop(process) if process.poll() is None else {"exit_code": process.returncode}
    name = str(model) if args.model else f"efficientnet_b0 {size[0]}x{size[1]} (random init, decoder 32, 64 bins)"
    result = {
        "model": name,
        "image": [HEIGHT, WIDTH],
        "threads": args.threads,
        "minutes": args.minutes,
        "window_s": args.window_s,
        "rates_hz": {"camera": args.rate_hz, "overload": args.overload_factor * args.rate_hz},
        "dds": f"Fast DDS, FASTDDS_BUILTIN_TRANSPORTS={os.environ['FASTDDS_BUILTIN_TRANSPORTS']}",
        "summary": verdict(windows),
        "shutdown": shutdown,
        "windows": windows,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"] | {"shutdown": shutdown}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
