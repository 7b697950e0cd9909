"""Throughput of `distill synth`: full-size (375x1242, HxW) frames with the LiDAR scan, PNG/.bin files and an mcap bag.

Usage: python benchmarks/synth_speed.py [--frames 10] [--size 375x1242] [--bag mcap]
Prints frames/s over wall time and over this process's CPU time (the latter is what a quiet machine would give when
other jobs share the cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from distill.data.synth import write_world
from distill.parsing import size_argument


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", type=size_argument, default=(375, 1242), help="HEIGHTxWIDTH")
    parser.add_argument("--bag", default="mcap", choices=["mcap", "sqlite3", "none"])
    parser.add_argument("--domain", default="kitti", choices=["kitti", "shifted"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        wall, cpu = time.perf_counter(), time.process_time()
        write_world(Path(folder) / "w", frames=args.frames, seed=0, domain=args.domain, size=args.size, bag=args.bag)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    height, width = args.size
    print(f"synth {args.domain} {height}x{width} + LiDAR + files + bag={args.bag}: {args.frames} frames")
    print(f"  wall: {args.frames / wall:.2f} frames/s ({wall / args.frames * 1000:.0f} ms/frame)")
    print(f"  cpu:  {args.frames / cpu:.2f} frames/s ({cpu / args.frames * 1000:.0f} ms/frame of CPU time)")


if __name__ == "__main__":
    main()
