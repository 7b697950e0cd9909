"""`make demo`: the whole mission end to end on a fresh machine, on CPU, in minutes.

Stages: render the synthetic world (train/val/test + rosbags) -> train a ViT teacher -> train a CNN student
baseline -> distil the same student from the teacher (DisDepth; `METHOD=tiekd make demo` picks another method) ->
export teacher and distilled student to ONNX -> evaluate everything (the papers' metrics, params, FLOPs, latency) ->
run the real ROS 2 depth node on the exported student, replaying the test bag at camera rate and recording /depth and
/points -> score the student on the real KITTI frame of the sample data ($DEPTHKD_SAMPLE_DATA) when present -> write
runs/demo/report.md.

Every size and step count comes from `DemoSettings` (`DemoSettings.tiny()` is the seconds-scale preset of the
tests). Each stage prints its progress and duration; a failing stage stops the demo with its message and exit 1.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from distill.config import DEFAULT_CONFIG
from distill.errors import UserError
from distill.sample_data import sample_data_root

CONFIG_DIR = DEFAULT_CONFIG.parent
KITTI_SAMPLE = sample_data_root() / "kitti_raw_sample"
IMAGE_TOPIC = "/kitti/camera_color_left/image_raw"
CAMERA_INFO_TOPIC = "/kitti/camera_color_left/camera_info"
MARKER = ".depthkd-demo"  # marks a folder the demo made, so a re-run may replace it


@dataclass(frozen=True)
class DemoSettings:
    """Everything that sets the demo's size and duration (the default is `make demo` on a 2-core CPU).

    Attributes:
        out: output folder (replaced on a re-run if the demo made it).
        method: distillation method (`kd.method`), from $METHOD in `make demo`.
        frames: synthetic frames, split ~70/15/15 % train/val/test by drive.
        size: (H, W) image size of the world, of training and of the exported models (multiples of 32).
        seed: seed of the world and of every run.
        batch_size: images per optimiser step.
        teacher_steps, student_steps, kd_steps: optimiser steps of the three runs (keep the two students' equal
            for a fair comparison).
        pictures: test frames shown in the report's strips.
        bench_runs: timed inferences per exported model.
        replay_rate: bag replay speed (1.0: camera rate).
        kitti: folder of the real KITTI sample (skipped when missing).
        threads: torch CPU threads; 0: one per core the load average leaves free (at least 1), unless
            $OMP_NUM_THREADS says otherwise.
    """

    out: Path = Path("runs/demo")
    method: str = "disdepth"
    frames: int = 160
    size: tuple[int, int] = (96, 320)
    seed: int = 0
    batch_size: int = 4
    teacher_steps: int = 400
    student_steps: int = 150
    kd_steps: int = 150
    pictures: int = 3
    bench_runs: int = 20
    replay_rate: float = 1.0
    kitti: Path = KITTI_SAMPLE
    threads: int = 0

    @classmethod
    def tiny(cls, out: Path, method: str = "disdepth") -> DemoSettings:
        """Seconds-scale settings for tests: a dozen 64x192 frames, two steps per run."""
        return cls(out=Path(out), method=method, frames=12, size=(64, 192), batch_size=2, teacher_steps=2,
                   student_steps=2, kd_steps=2, pictures=2, bench_runs=2)  # fmt: skip


class StageFailed(Exception):
    """A stage raised; `title` names it and `__cause__` is the original error."""

    def __init__(self, title: str, error: BaseException) -> None:
        super().__init__(f"stage '{title}' failed: {error}")
        self.title, self.error = title, error


class Stages:
    """Numbered stages with a header, a duration line and failures wrapped in StageFailed.

    `durations[title]` = {"wall_s", "cpu_s"}: CPU seconds of this process and of the children it waited for, so
    runs on a busy machine can be compared with idle ones.
    """

    def __init__(self, titles: list[str]) -> None:
        self.titles, self.durations = titles, {}

    @staticmethod
    def _cpu() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    @contextmanager
    def run(self, title: str) -> Iterator[None]:
        number = f"[{self.titles.index(title) + 1}/{len(self.titles)}]"
        print(f"\n=== {number} {title}", flush=True)
        start, cpu = time.perf_counter(), self._cpu()
        try:
            yield
        except Exception as error:
            raise StageFailed(title, error) from error
        wall = time.perf_counter() - start
        self.durations[title] = {"wall_s": wall, "cpu_s": self._cpu() - cpu}
        print(f"=== {number} {title}: done in {wall:.1f} s ({self.durations[title]['cpu_s']:.0f} CPU s)", flush=True)


def prepare_output(out: Path) -> None:
    """Create `out`, replacing a previous demo's folder; refuse to touch a non-empty folder the demo did not make."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} exists and was not made by the demo: move it away first")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `make demo` (python -m distill.verbs.demo); safe to delete\n")


def set_threads(requested: int) -> int:
    """Set and return torch's CPU threads (see DemoSettings.threads).

    More OpenMP threads than free cores spin at every barrier: on a 2-core machine at load 6, training with 2 threads
    ran 6x slower per step than with 1 (19 s vs 3.3 s).
    """
    import torch

    if requested <= 0 and "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    threads = requested if requested > 0 else max(1, min(cores, round(cores - os.getloadavg()[0])))
    torch.set_num_threads(threads)
    return threads


def check_method(method: str) -> None:
    """Fail in a second, not after the teacher has trained, when $METHOD names no distillation method."""
    from distill.config import load_config
    from distill.kd.registry import resolve_kd

    if method == "none":
        raise UserError("METHOD=none trains no distilled student; choose a distillation method, e.g. disdepth")
    resolve_kd(load_config(None, [f"kd.method={method}"], check_paths=False))


def make_world(settings: DemoSettings, results: dict) -> Path:
    """Render the synthetic world; returns its root and records split sizes and the test bag."""
    from distill.data.synth import write_world

    root = settings.out / "data"
    write_world(root, frames=settings.frames, seed=settings.seed, size=settings.size, bag="mcap")
    splits = {name: (root / "splits" / f"{name}.txt").read_text().splitlines() for name in ("train", "val", "test")}
    test_drive = splits["test"][0].split()[0].split("/")[1].removesuffix("_sync")
    results["data"] = {"root": str(root), "frames": {name: len(lines) for name, lines in splits.items()},
                       "test_bag": str(root / "bags" / test_drive)}  # fmt: skip
    print(f"frames: {results['data']['frames']}, test bag {results['data']['test_bag']}")
    return root


def train_overrides(settings: DemoSettings, name: str, steps: int, extra: list[str]) -> list[str]:
    """`key=value` overrides putting a demo run in settings.out at the demo's size and step count."""
    height, width = settings.size
    return [
        f"run.out_dir={settings.out.resolve()}", f"run.name={name}", f"run.seed={settings.seed}",
        f"data.root={(settings.out / 'data').resolve()}", f"data.size=[{height}, {width}]",
        f"data.batch_size={settings.batch_size}", f"train.steps={steps}", "train.epochs=null", *extra,
    ]  # fmt: skip


def train(settings: DemoSettings, config: str, name: str, steps: int, extra: list[str]) -> Path:
    """`distill train config/<config> ...` in this process; returns the run folder."""
    from distill.training.run import run_training

    overrides = train_overrides(settings, name, steps, extra)
    print(f"distill train config/{config} " + " ".join(overrides))
    return run_training(CONFIG_DIR / config, overrides)


class BackgroundTraining:
    """`distill train` in a second, single-threaded process with its output in a log (a context manager).

    Two independent runs on a 2-core machine use both cores fully as two processes; one process with two OpenMP
    threads would not (see `set_threads`).
    """

    def __init__(self, settings: DemoSettings, config: str, name: str, steps: int) -> None:
        overrides = train_overrides(settings, name, steps, [])
        self.command = [sys.executable, "-m", "distill.cli", "train", str(CONFIG_DIR / config), *overrides]
        self.log, self.run_dir = settings.out / f"{name}.log", settings.out.resolve() / name
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> BackgroundTraining:
        print(f"in the background (log {self.log}): distill train " + " ".join(self.command[4:]), flush=True)
        with self.log.open("wb") as log:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait(self) -> Path:
        """Wait for the run; its folder, or RuntimeError with the end of its log."""
        print(f"waiting for the background run ({self.log}) ...", flush=True)
        code = self.process.wait()
        tail = "\n".join(self.log.read_text(errors="replace").replace("\r", "\n").splitlines()[-12:])
        if code != 0:
            raise RuntimeError(f"background training failed with exit code {code}; end of {self.log}:\n{tail}")
        print(tail)
        return self.run_dir

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:  # the stage failed: do not leave it running
            self.process.terminate()
            self.process.wait()


def export(settings: DemoSettings, runs: dict[str, Path], results: dict) -> dict[str, Path]:
    """ONNX files of the teacher (for the speed comparison) and of the distilled student (the deliverable)."""
    from distill.models import load_model
    from distill.verbs.export import export_onnx, print_usage

    exported = {}
    for role in ("teacher", "kd"):
        model, config = load_model(runs[role])
        path, _ = export_onnx(model, settings.out / "export" / role, settings.size, False, 17, config)
        exported[role] = path
    print_usage([exported["kd"]])
    results["export"] = {role: str(path) for role, path in exported.items()}
    return exported


def evaluate_all(settings: DemoSettings, runs: dict[str, Path], onnx: dict[str, Path], results: dict) -> None:
    """Metrics of every model on the test split, params/GFLOPs, ONNX Runtime latency and the speed ratio."""
    from distill.metrics import format_metrics_table
    from distill.models import load_model
    from distill.models.info import count_flops, count_parameters
    from distill.verbs.bench import bench_engine, open_for_bench
    from distill.verbs.evaluate import run_eval

    data, names = settings.out / "data", model_names(settings)
    models = {}
    for role, run in runs.items():
        metrics = run_eval(run, data=data, json_out=settings.out / "eval" / f"{role}.json")
        network, _ = load_model(run)
        params, gflops = count_parameters(network) / 1e6, count_flops(network, settings.size)
        models[role] = {"name": names[role], "run": str(run), "metrics": metrics, "params_m": params, "gflops": gflops}
    onnx_metrics = run_eval(onnx["kd"], data=data, json_out=settings.out / "eval" / "kd_onnx.json")
    models["kd_onnx"] = {"name": names["kd"] + " (ONNX Runtime)", "onnx": str(onnx["kd"]), "metrics": onnx_metrics}
    for role, path in onnx.items():
        engine, size = open_for_bench(path, "onnxruntime", None)
        latency = bench_engine(engine, path.name, size, settings.bench_runs)
        models[role].update(latency_ms=latency.median_ms, latency_p90_ms=latency.p90_ms, backend=latency.backend)
    results["models"] = models
    results["speed_ratio"] = models["teacher"]["latency_ms"] / models["kd"]["latency_ms"]
    print("\n" + format_metrics_table({m["name"]: m["metrics"] for m in models.values()}))
    print(f"student vs teacher (ONNX Runtime, {settings.size[0]}x{settings.size[1]}): "
          f"{models['kd']['latency_ms']:.1f} ms vs {models['teacher']['latency_ms']:.1f} ms per frame, "
          f"{results['speed_ratio']:.2f}x faster; {models['kd']['params_m']:.2f}M vs "
          f"{models['teacher']['params_m']:.2f}M parameters")  # fmt: skip


def model_names(settings: DemoSettings) -> dict[str, str]:
    return {"teacher": "teacher (ViT)", "student": "student (supervised)", "kd": f"student + {settings.method}"}


def live_node(settings: DemoSettings, model: Path, results: dict) -> None:
    """The real depth_node process on the exported student, fed the test bag at camera rate; outputs recorded."""
    from distill.verbs.ros_player import NodeProcess, replay_and_record

    script = Path(sys.executable).with_name("depth_node")
    if not script.is_file():
        raise UserError(f"{script} not found: install the node with `pip install -e '.[ros]'` (make demo does)")
    command = [
        str(script), "--ros-args", "--params-file", str(CONFIG_DIR / "kitti.yaml"), "-p", f"model:={model.resolve()}",
        "-p", "colorize_points:=true", "-r", f"image:={IMAGE_TOPIC}", "-r", f"camera_info:={CAMERA_INFO_TOPIC}",
    ]  # fmt: skip
    domain = random.SystemRandom().randint(1, 100)  # our own DDS domain: no cross-talk with other ROS processes
    live = settings.out / "live"
    print(f"ROS_DOMAIN_ID={domain} " + " ".join(command))
    with NodeProcess(command, domain, live / "node.log") as node:
        try:
            bag = Path(results["data"]["test_bag"])
            replay = replay_and_record(bag, live / "recorded", IMAGE_TOPIC, CAMERA_INFO_TOPIC, domain,
                                       rate=settings.replay_rate, alive=node.alive)  # fmt: skip
        except RuntimeError as error:
            raise RuntimeError(f"{error}; depth_node log ({node.log}):\n{node.log_tail()}") from None
        code = node.stop()
    if code != 0:
        raise RuntimeError(f"depth_node exited with code {code} after SIGINT; log {node.log}:\n{node.log_tail()}")
    results["live"] = {**asdict(replay), "output": str(replay.output), "node_exit_code": code,
                       "node_log": str(node.log), "domain_id": domain, "command": command}  # fmt: skip
    missing = [topic for topic, count in replay.received.items() if count == 0]
    if missing:
        raise RuntimeError(f"the node published nothing on {', '.join(missing)}")
    print(f"sent {replay.frames} frames in {replay.duration_s:.1f} s, recorded {replay.received} -> {replay.output}; "
          f"node stopped with SIGINT, exit code {code}")  # fmt: skip


def kitti_frame(settings: DemoSettings, model: Path, results: dict) -> None:
    """The exported student on the real KITTI frame, scored against the official annotated ground truth."""
    from distill.config import load_data_config
    from distill.data import build_dataset
    from distill.inference import engine_predictor, evaluate

    root = settings.kitti
    data = {"kind": "kitti", "root": str(root), "raw_root": str(root), "gt_root": str(root / "data_depth_annotated")}
    dataset = build_dataset(load_data_config(data), "test", augment=False)
    predict = engine_predictor(model, backend="onnxruntime")
    scores = {align: evaluate(predict, dataset, crop="garg", align=None if align == "none" else align,
                              min_depth=1e-3, max_depth=80.0, paste_full=True, progress=False)
              for align in ("none", "median")}  # fmt: skip
    results["kitti"] = {"root": str(root), "frame": dataset[0]["meta"]["name"], "metrics": scores["none"],
                        "metrics_median": scores["median"]}  # fmt: skip
    print(f"KITTI {results['kitti']['frame']}: AbsRel {scores['none']['abs_rel']:.3f} (metric), "
          f"{scores['median']['abs_rel']:.3f} (median-scaled); trained on synthetic data only")  # fmt: skip


def run_demo(settings: DemoSettings) -> dict:
    """Run every stage; returns the report dict also written to out/report.json."""
    from distill.verbs.report import write_report

    has_kitti = settings.kitti.is_dir()
    titles = ["synthetic world", "teacher + student baseline", f"distilled student ({settings.method})",
              "export to ONNX", "evaluate", "live ROS 2 node", "real KITTI frame", "report"]  # fmt: skip
    if not has_kitti:
        titles.remove("real KITTI frame")
    stages = Stages(titles)
    check_method(settings.method)
    prepare_output(settings.out)
    started = time.perf_counter()
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
                     "load_average_start": os.getloadavg(), "cpus": os.cpu_count(),
                     "torch_threads": (threads := set_threads(settings.threads))}  # fmt: skip
    print(f"{results['cpus']} CPU cores, load average {results['load_average_start'][0]:.1f}: "
          f"torch uses {results['torch_threads']} thread(s)")  # fmt: skip
    runs: dict[str, Path] = {}
    with stages.run("synthetic world"):
        make_world(settings, results)
    with (
        stages.run(titles[1]),
        BackgroundTraining(settings, "demo-student.yaml", "student", settings.student_steps) as student,
    ):
        set_threads(max(1, threads - 1))  # one core is the background run's
        runs["teacher"] = train(settings, "demo-teacher.yaml", "teacher", settings.teacher_steps, [])
        runs["student"] = student.wait()
        set_threads(threads)
    with stages.run(titles[2]):
        extra = [f"kd.method={settings.method}", f"teacher.weights={runs['teacher'].resolve()}"]
        runs["kd"] = train(settings, "demo-student.yaml", f"kd-{settings.method}", settings.kd_steps, extra)
    with stages.run("export to ONNX"):
        onnx = export(settings, runs, results)
    with stages.run("evaluate"):
        evaluate_all(settings, runs, onnx, results)
    with stages.run("live ROS 2 node"):
        live_node(settings, onnx["kd"], results)
    if has_kitti:
        with stages.run("real KITTI frame"):
            kitti_frame(settings, onnx["kd"], results)
    else:
        print(f"\n(no real KITTI sample at {settings.kitti}, set DEPTHKD_SAMPLE_DATA: that stage is skipped)")
    with stages.run("report"):
        results.update(stages=stages.durations, load_average_end=os.getloadavg())
        results["total_s"] = time.perf_counter() - started
        report = write_report(settings, runs, results, names=model_names(settings), image_topic=IMAGE_TOPIC,
                              camera_info_topic=CAMERA_INFO_TOPIC)  # fmt: skip
    print(f"\ndemo done in {results['total_s'] / 60:.1f} min: {report}")
    return results


def main(settings: DemoSettings | None = None) -> int:
    """`make demo`: the default settings, with the distillation method from $METHOD; exit code 0 or 1."""
    settings = settings or replace(DemoSettings(), method=os.environ.get("METHOD", "disdepth"))
    try:
        run_demo(settings)
    except StageFailed as failure:
        if not isinstance(failure.error, UserError):
            traceback.print_exception(failure.error)
        print(f"\nmake demo: {failure}", file=sys.stderr)
        return 1
    except UserError as error:
        print(f"make demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
