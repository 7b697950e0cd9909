"""Runs of the distillation-gain benchmark (benchmarks/distill_gain.py): the worlds, the foundation-teacher stand-in,
and one student run per (regime, row, seed), trained in parallel single-thread processes and cached per folder.

Every run goes through `distill.training.run.run_training` and every score through `distill.verbs.evaluate.run_eval`
(KITTI protocol, Garg crop, no alignment, the test split of the regime's world), so the figures are what
`distill train` / `distill eval` give. A run's folder is keyed by its overrides: an interrupted benchmark resumes
each run from its `last` checkpoint, and a finished run is scored once (score-<world>.json in its folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

LABELLED_SPLIT = "train_labelled"  # split file of a robot-logs world: the training frames that keep their labels


@dataclass(frozen=True)
class Job:
    """One training run: its folder name, `distill train` overrides, and the world whose test split scores it."""

    name: str
    overrides: tuple[str, ...]
    world: str  # folder of the scoring world
    diagnose: bool = False  # DisDepth with FAM + LAM: ghost advantage and LAM support


def make_world(folder: Path, parts: list[tuple[str, int, int]], size: tuple[int, int]) -> Path:
    """Render `parts` [(domain, frames, seed)] into `folder` (one multi-domain corpus) unless already complete."""
    from distill.data.synth import write_corpus

    if not (folder / ".complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_corpus(folder, parts, size, bag="none")
        (folder / ".complete").touch()
    return folder


def make_worlds(worlds: list[tuple[Path, list[tuple[str, int, int]]]], size: tuple[int, int], workers: int) -> None:
    """`make_world` for each (folder, parts), in `workers` single-thread processes (rendering is CPU-bound numpy)."""
    missing = [(folder, parts) for folder, parts in worlds if not (folder / ".complete").is_file()]
    if workers <= 1 or len(missing) <= 1:
        for folder, parts in missing:
            make_world(folder, parts, size)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_single_thread) as pool:
        for future in [pool.submit(make_world, folder, parts, size) for folder, parts in missing]:
            future.result()


def write_labelled_split(world: Path, labelled: int) -> tuple[int, int]:
    """Write splits/train_labelled.txt: `labelled` training frames spread evenly over the drives (the rest of the
    training split comes unlabelled). Returns (labelled, unlabelled) frame counts."""
    lines = [line for line in (world / "splits" / "train.txt").read_text().splitlines() if line.strip()]
    if not 0 < labelled <= len(lines):
        raise ValueError(f"{labelled} labelled frames asked, the training split of {world} has {len(lines)}")
    chosen = [lines[round(i * len(lines) / labelled)] for i in range(labelled)]
    (world / "splits" / f"{LABELLED_SPLIT}.txt").write_text("".join(f"{line}\n" for line in chosen))
    return len(chosen), len(lines) - len(chosen)


def run_folder(cache: Path, name: str, overrides: tuple[str, ...]) -> Path:
    """The cache folder of a run: its name and a hash of its overrides."""
    return cache / "runs" / f"{name}-{hashlib.sha1(chr(10).join(overrides).encode()).hexdigest()[:8]}"


def train(cache: Path, job: Job) -> Path:
    """Train (or resume, or reuse) the run of `job`; returns its folder."""
    from distill.checkpoint import read_state
    from distill.training.run import run_training

    run_dir = run_folder(cache, job.name, job.overrides)
    steps = int(next(o for o in job.overrides if o.startswith("train.steps=")).split("=")[1])
    last = run_dir / "last" / "state.json"
    if last.is_file() and read_state(last.parent)["step"] >= steps:
        return run_dir
    if run_dir.is_dir() and not last.is_file():  # stopped before its first checkpoint: start it afresh, same folder
        shutil.rmtree(run_dir)
    resume = ["run.resume=true"] if last.is_file() else []
    where = [f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}"]
    return run_training(None, [*job.overrides, *where, *resume])


def timed_train(cache: Path, job: Job) -> tuple[Path, dict[str, float]]:
    """`train`, and the training's cost: wall and CPU seconds of this process (cost.json in the run folder, written
    by the run that finished it; CPU seconds tell the single-thread cost on a loaded machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run_dir = train(cache, job)
    path = run_dir / "cost.json"
    if not path.is_file():
        cost = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        path.write_text(json.dumps({key: round(value, 1) for key, value in cost.items()}))
    return run_dir, json.loads(path.read_text())


def score(run_dir: Path, world: Path) -> dict[str, float]:
    """Test-split metrics of a run's last checkpoint on `world`, cached in the run folder."""
    from distill.verbs.evaluate import run_eval

    path = run_dir / f"score-{world.name}.json"
    if not path.is_file():
        path.write_text(json.dumps(run_eval(run_dir / "last", world, crop="garg", align="none")))
    return json.loads(path.read_text())


def run_job(cache: Path, job: Job) -> dict:
    """Train and score one job -> {"metrics": ..., "diagnostics"?: ...}, or {"status": "failed", "reason": ...}."""
    try:
        run_dir, cost = timed_train(cache, job)
        result = {"metrics": score(run_dir, Path(job.world)), "run": str(run_dir), "cost": cost}
        if job.diagnose:
            result["diagnostics"] = diagnostics(run_dir)
    except Exception as error:  # one broken method must not cost the other rows
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    return result


def _single_thread() -> None:
    """Worker initialiser: one torch thread per process (two threads per process oversubscribe two cores)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_jobs(cache: Path, jobs: list[Job], workers: int, on_done=None) -> list[dict]:
    """Run `jobs` in `workers` spawned single-thread processes (in this process when workers <= 1); results in
    the jobs' order. `on_done(job, result)` is called as each finishes."""
    if workers <= 1:
        results = []
        for job in jobs:
            results.append(run_job(cache, job))
            on_done and on_done(job, results[-1])
        return results
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_single_thread) as pool:
        futures = [pool.submit(run_job, cache, job) for job in jobs]
        for job, future in zip(jobs, futures):
            future.add_done_callback(lambda f, job=job: on_done and on_done(job, f.result()))
        return [future.result() for future in futures]


def diagnostics(run_dir: Path) -> dict:
    """DisDepth's own diagnostics after the run's last step (`DisDepthMethod.diagnostics`, written by
    `distill train` to diagnostics.json): ghost advantage (student SILog − ghost SILog on the same batch) at the last
    step before KD and at the last step, and the LAM support exp(H(A)) / (H·W) per level of the last batch."""
    path = run_dir / "diagnostics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run left no diagnostics (a method without diagnostics())")
    found = json.loads(path.read_text())
    return {"ghost_advantage": found["ghost_advantage"], "lam_support": found["lam_support"]}
