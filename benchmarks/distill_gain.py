"""Distillation gain with paired seeds, a placebo and two regimes: what each method buys over plain training.

Teacher: a foundation-model stand-in, a transformer (timm) trained once on a multi-domain synthetic corpus (styles
kitti, overcast and van: three palettes, lights, focal lengths and camera heights; seed 7, so never the drives of
the test worlds) and cached. Build it alone with `python benchmarks/distill_gain.py --stage teacher`: the worlds
render in parallel processes, then the teacher trains teacher_steps steps alone with one thread per core
(config.workers); its wall and CPU seconds are recorded in config.teacher_cost.

Regimes, each with one student architecture, step count and data for all of its rows:
- `supervised` (the paper's setting): the kitti-style world of seed 0, every training frame labelled;
- `robot_logs` (the product's setting): the `shifted` world of seed 0, a style and rig the teacher never saw (nor
  any label of it): robot_labelled training frames keep their labels (data.labelled_split), the other training
  frames come unlabelled (valid all False), as bag frames do. KD terms see every frame; task and ghost losses only
  labelled pixels. Scored on that world's (labelled) test split.
Rows (DisDepth §3.3–3.4, TIE-KD §3, TIE-KD Table I): baseline (task loss only); placebo (DisDepth with a random-init
teacher of the same spec: any gain it shows is not knowledge transfer); disdepth (FAM + LAM + ghost); disdepth_lgconv
(the paper's full method, LG-Conv student); tiekd; response_ssim; in robot_logs labelfree (label-free KD from random
init: no label of the target world at all). Each row trains from random init with the method's config defaults.

Statistics: every row runs each seed (run.seed: init, batches, augmentation) and is paired by seed with the
baseline: ΔRMSE_s = RMSE_row,s − RMSE_baseline,s; delta_rmse is their mean, delta_rmse_se its standard error
(sd / √n), gap_closure = −delta_rmse / (RMSE_baseline − RMSE_teacher) (null when the teacher is no better than the
baseline), significant = delta_rmse < −2·SE. Claim a
gain only when significant and better than the placebo. No λ or scale is chosen here (no split is used for
selection; methods run with their config defaults, whose rules are documented in config/default.yaml).
Diagnostics (DisDepth rows): the ghost advantage (student SILog − ghost SILog, end of warm-up and last steps) and the
LAM support exp(H(A))/(H·W) per level (benchmarks/gain_runs.py).

    python benchmarks/distill_gain.py --quick                 # smoke run (CI), tiny sizes, a few rows, 2 seeds
    python benchmarks/distill_gain.py --stage teacher         # worlds + teacher only (~12 + ~20-30 min, 2 cores)
    python benchmarks/distill_gain.py                         # full table on CPU: 2 single-thread processes
Measured single-thread cost per student step at 64x192, batch 8 (CPU seconds, loaded 2-core machine): baseline
0.45, response_ssim 0.7, placebo/disdepth 1.6, disdepth_lgconv 1.75, tiekd 1.65, labelfree 2.2 (teacher Swin-T 1.4);
the 39 student runs of the default setting take about 45 min on two processes, about 75-80 min from scratch.
    python benchmarks/distill_gain.py --device cuda           # GPU scale: full resolution, more steps, 1 process
Worlds, the teacher, runs and scores are cached under --cache (runs keyed by their overrides), so an interrupted
benchmark resumes; delete the cache after changing a method's code. Writes --out (.json, .md beside it); without
--out only the default setting replaces results/distill_gain.json, other settings go to runs/distill_gain/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gain_runs, gain_stats: beside this file

from gain_runs import LABELLED_SPLIT, Job, make_worlds, run_folder, run_jobs, score, timed_train, write_labelled_split
from gain_stats import DIAGNOSED, mean_metrics, paired, row_cost, summarise_diagnostics

from distill.errors import UserError

RESULTS = Path(__file__).resolve().parent / "results" / "distill_gain.json"
METRICS = (("abs_rel", "AbsRel"), ("sq_rel", "SqRel"), ("rmse", "RMSE"), ("d1", "δ1"))
CORPUS_SEED = 7  # the teacher's worlds; the regimes' worlds are seed 0
REGIMES = {"supervised": "kitti", "robot_logs": "shifted"}  # regime -> domain of its target world


@dataclass(frozen=True)
class Setting:
    """Sizes and lengths of one benchmark scale (every field is recorded in the JSON `config`)."""

    size: tuple[int, int]  # [H, W] pixels, rendered and trained at
    batch: int
    bins: int
    corpus: tuple[tuple[str, int], ...]  # the teacher's worlds: (domain, frames), ~70 % of each for training
    teacher_spec: str
    teacher_steps: int
    teacher_width: int  # decoder width of the teacher
    teacher_lr: float
    supervised_frames: int  # frames of the supervised world (~70/15/15 % train/val/test by drive)
    robot_frames: int  # frames of the robot-logs world
    robot_labelled: int  # its training frames that keep their labels (the rest are unlabelled)
    student_arch: str  # random-init timm CNN
    student_steps: int  # every student row of both regimes trains this many steps
    student_width: int  # decoder width of the students (limited capacity)
    student_lr: float
    seeds: tuple[int, ...]
    rows: tuple[str, ...]
    workers: int  # parallel training processes, one torch thread each (CPU)


ROW_OVERRIDES = {
    "baseline": [],
    "placebo": ["kd.method=disdepth"],  # teacher: random init of the same spec
    "disdepth": ["kd.method=disdepth"],
    "disdepth_lgconv": ["kd.method=disdepth", "model.lgconv=true"],
    "tiekd": ["kd.method=tiekd"],
    "response_ssim": ["kd.method=response", "kd.response.loss=ssim"],
    "labelfree": ["kd.method=labelfree"],
}
ROBOT_ONLY = ("labelfree",)
DEFAULT_CORPUS = (("kitti", 180), ("overcast", 180), ("van", 180))
SETTINGS = {
    "quick": Setting(size=(32, 96), batch=2, bins=16, corpus=(("kitti", 6), ("van", 6)),
                     teacher_spec="timm:vit_tiny_patch16_224", teacher_steps=12, teacher_width=16, teacher_lr=1e-3,
                     supervised_frames=10, robot_frames=14, robot_labelled=3, student_arch="resnet18",
                     student_steps=6, student_width=16, student_lr=1e-3, seeds=(0, 1),
                     rows=("baseline", "disdepth", "labelfree"), workers=2),
    "default": Setting(size=(64, 192), batch=8, bins=64, corpus=DEFAULT_CORPUS,
                       teacher_spec="timm:swin_tiny_patch4_window7_224", teacher_steps=1500, teacher_width=64,
                       teacher_lr=4e-4, supervised_frames=240, robot_frames=520, robot_labelled=80,
                       student_arch="efficientnet_b0", student_steps=100, student_width=32, student_lr=1e-3,
                       seeds=(0, 1, 2), rows=tuple(ROW_OVERRIDES), workers=2),
    "cuda": Setting(size=(352, 1216), batch=8, bins=256, corpus=(("kitti", 1200), ("overcast", 1200), ("van", 1200)),
                    teacher_spec="timm:swin_tiny_patch4_window7_224", teacher_steps=12000, teacher_width=128,
                    teacher_lr=2e-4, supervised_frames=1200, robot_frames=540, robot_labelled=80,
                    student_arch="efficientnet_b0", student_steps=3000, student_width=64, student_lr=4e-4,
                    seeds=(0, 1, 2), rows=tuple(ROW_OVERRIDES), workers=1),
}  # fmt: skip


class Bench:
    """The setting's worlds, teacher and student jobs under `cache/`."""

    def __init__(self, setting: Setting, cache: Path, device: str) -> None:
        self.setting, self.cache, self.device = setting, cache, device
        height, width = setting.size
        tag = f"{height}x{width}"
        corpus = "+".join(f"{domain}{frames}" for domain, frames in setting.corpus)
        self.corpus = cache / "worlds" / f"corpus-{corpus}-seed{CORPUS_SEED}-{tag}"
        frames = {"supervised": setting.supervised_frames, "robot_logs": setting.robot_frames}
        self.worlds = {regime: cache / "worlds" / f"{domain}{frames[regime]}-seed0-{tag}"
                       for regime, domain in REGIMES.items()}  # fmt: skip
        self.frames: dict[str, tuple[int, int]] = {}  # regime -> (labelled, unlabelled) training frames

    def make_worlds(self) -> None:
        s = self.setting
        frames = {"supervised": s.supervised_frames, "robot_logs": s.robot_frames}
        corpus = [(self.corpus, [(domain, count, CORPUS_SEED) for domain, count in s.corpus])]
        targets = [(self.worlds[regime], [(domain, frames[regime], 0)]) for regime, domain in REGIMES.items()]
        make_worlds([*corpus, *targets], s.size, s.workers if self.device == "cpu" else 1)
        self.frames["supervised"] = (_train_frames(self.worlds["supervised"]), 0)
        self.frames["robot_logs"] = write_labelled_split(self.worlds["robot_logs"], s.robot_labelled)

    def common(self, steps: int, lr: float, root: Path, seed: int) -> list[str]:
        """Overrides shared by every run: data, length, logging (every 10 steps: the diagnostics read train.csv)."""
        height, width = self.setting.size
        return [f"run.device={self.device}", "run.tensorboard=false", f"run.seed={seed}", "data.kind=kitti",
                f"data.root={root}", f"data.size=[{height}, {width}]", f"data.batch_size={self.setting.batch}",
                "data.num_workers=0", "data.val_split=null", f"train.steps={steps}", "train.epochs=null",
                f"train.lr={lr}", f"train.lr_end={lr / 10}", f"train.warmup_steps={max(steps // 20, 1)}",
                f"train.log_every={max(min(10, steps // 10), 1)}", "train.val_every=0",
                f"train.ckpt_every={max(steps // 4, 1)}", f"model.bins={self.setting.bins}"]  # fmt: skip

    def teacher_job(self) -> Job:
        s = self.setting
        overrides = [*self.common(s.teacher_steps, s.teacher_lr, self.corpus, 0), "model.kind=teacher",
                     f"model.spec={s.teacher_spec}", f"model.decoder_width={s.teacher_width}"]  # fmt: skip
        return Job("teacher", tuple(overrides), str(self.corpus))

    def student_job(self, regime: str, row: str, seed: int) -> Job:
        s = self.setting
        overrides = [*self.common(s.student_steps, s.student_lr, self.worlds[regime], seed), "model.kind=student",
                     f"model.arch={s.student_arch}", f"model.decoder_width={s.student_width}"]  # fmt: skip
        if regime == "robot_logs":
            overrides.append(f"data.labelled_split={LABELLED_SPLIT}")
        if row == "placebo":
            overrides.append(f"teacher.spec={s.teacher_spec}")
        elif ROW_OVERRIDES[row]:
            teacher = self.teacher_job()
            overrides.append(f"teacher.weights={run_folder(self.cache, teacher.name, teacher.overrides)}")
        overrides += ROW_OVERRIDES[row]
        return Job(f"{regime}-{row}-s{seed}", tuple(overrides), str(self.worlds[regime]), row in DIAGNOSED)

    def rows(self, regime: str) -> list[str]:
        return [row for row in self.setting.rows if regime == "robot_logs" or row not in ROBOT_ONLY]


def _train_frames(world: Path) -> int:
    return sum(1 for line in (world / "splits" / "train.txt").read_text().splitlines() if line.strip())


def build_teacher(bench: Bench) -> dict:
    """Train (or reuse) the teacher; its test metrics on each regime's world and its cost in seconds."""
    import torch

    threads = torch.get_num_threads()
    if bench.device == "cpu":  # the teacher trains alone: one thread per core (config.workers)
        torch.set_num_threads(max(bench.setting.workers, threads))
    try:
        run_dir, cost = timed_train(bench.cache, bench.teacher_job())
    finally:
        torch.set_num_threads(threads)
    metrics = {regime: score(run_dir, world) for regime, world in bench.worlds.items()}
    s = bench.setting
    return {"spec": s.teacher_spec, "steps": s.teacher_steps, "train_frames": _train_frames(bench.corpus),
            "metrics": metrics, "cost": cost}  # fmt: skip


def run(setting: Setting, cache: Path, device: str, stage: str) -> dict | None:
    """The benchmark for one setting (stage "teacher": worlds and teacher only, returns None)."""
    started = time.perf_counter()
    bench = Bench(setting, cache, device)
    bench.make_worlds()
    teacher = build_teacher(bench)
    print(f"teacher: {teacher['cost']} to train; RMSE " + ", ".join(
        f"{regime} {m['rmse']:.3f}" for regime, m in teacher["metrics"].items()))  # fmt: skip
    if stage == "teacher":
        return None
    jobs = {(regime, row, seed): bench.student_job(regime, row, seed)
            for regime in REGIMES for row in bench.rows(regime) for seed in setting.seeds}  # fmt: skip

    def done(job: Job, result: dict) -> None:
        print(f"{job.name}: {result.get('metrics', {}).get('rmse', result.get('reason'))}", flush=True)

    workers = setting.workers if device == "cpu" else 1
    results = dict(zip(jobs, run_jobs(cache, list(jobs.values()), workers, done)))
    regimes = {}
    for regime in REGIMES:
        rows = {}
        for row in bench.rows(regime):
            per_seed = [results[(regime, row, seed)] for seed in setting.seeds]
            per_seed = [r["metrics"] if "metrics" in r else {k: r[k] for k in ("status", "reason")} for r in per_seed]
            rows[row] = {"per_seed": per_seed, "mean": mean_metrics(per_seed)}
        labelled, unlabelled = bench.frames[regime]
        teacher_rmse = teacher["metrics"][regime]["rmse"]
        regimes[regime] = {
            "labelled_frames": labelled, "unlabelled_frames": unlabelled, "student_steps": setting.student_steps,
            "seeds": list(setting.seeds), "teacher_rmse": teacher_rmse, "rows": rows,
            "paired": paired(rows, teacher_rmse),
        }  # fmt: skip
    config = {**dataclasses.asdict(setting), "device": device, "cache": str(cache), "row_overrides": ROW_OVERRIDES,
              "protocol": "KITTI metrics, Garg crop, no alignment, depth 1e-3..80 m, test split of each regime's world",
              "worlds": {"teacher": f"corpus of {dict(setting.corpus)} seed {CORPUS_SEED}",
                         **{r: f"{d} seed 0" for r, d in REGIMES.items()}},
              "teacher_cost": teacher["cost"], "row_cost": row_cost(results),
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    teacher = {key: teacher[key] for key in ("spec", "steps", "train_frames", "metrics")}
    return {"teacher": teacher, "regimes": regimes, "diagnostics": summarise_diagnostics(results), "config": config}


def markdown(report: dict) -> str:
    """Per regime: the rows (mean metrics, paired ΔRMSE ± SE, gap closure, significance); then the diagnostics."""
    c, t = report["config"], report["teacher"]
    height, width = c["size"]
    lines = [f"Teacher {t['spec']} ({t['steps']} steps on {t['train_frames']} frames of {c['worlds']['teacher']}); "
             f"students {c['student_arch']} ({c['student_steps']} steps), seeds {c['seeds']}; {height}x{width}; "
             f"{c['protocol']}.", ""]  # fmt: skip
    header = "| row | " + " | ".join(title for _, title in METRICS) + " | ΔRMSE ± SE | gap closure | significant |"
    for regime, r in report["regimes"].items():
        lines += [f"**{regime}** ({c['worlds'][regime]}; {r['labelled_frames']} labelled + {r['unlabelled_frames']} "
                  f"unlabelled training frames; teacher RMSE {r['teacher_rmse']:.4f})", "", header,
                  "|---|" + "---:|" * (len(METRICS) + 3)]  # fmt: skip
        for name, row in r["rows"].items():
            mean, pair = row["mean"], r["paired"].get(name)
            cells = [f"{mean[key]:.4f}" for key, _ in METRICS] if mean else ["failed"] * len(METRICS)
            if pair:
                se = "n/a" if pair["delta_rmse_se"] is None else f"{pair['delta_rmse_se']:.4f}"
                gap = "n/a" if pair["gap_closure"] is None else f"{pair['gap_closure']:+.1%}"
                cells += [f"{pair['delta_rmse']:+.4f} ± {se}", gap, "yes" if pair["significant"] else "no"]
            else:
                cells += [""] * 3
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for row, d in report["diagnostics"].items():
        ghost, support = d["ghost_advantage"], ", ".join(f"{v:.3f}" for v in d["lam_support"])
        lines.append(f"Diagnostics {row}: ghost advantage (student − ghost SILog) end of warm-up "
                     f"{ghost['warmup_end']}, last {ghost['last']}; LAM support per level {support}.")  # fmt: skip
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few steps, a few rows")
    parser.add_argument("--stage", default="all", choices=("all", "teacher"), help="teacher: build the teacher only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the GPU-scale setting")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache"), help="worlds, runs and scores")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report, the table beside it as .md (default: results/distill_gain.json for the "
                             "default setting; runs/distill_gain/<variant>.json otherwise)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Setting field (YAML value), e.g. --set student_steps=800")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1)")
    return parser.parse_args()


def default_out(quick: bool, sets: list[str], device: str = "cpu") -> Path:
    """Where a run writes without --out: only the default setting replaces the committed table; a smoke run, the
    GPU setting or a --set variant goes to runs/distill_gain/, named after what it changed."""
    if not quick and not sets and device == "cpu":
        return RESULTS
    name = "_".join(["quick"] * quick + ["cuda"] * (device == "cuda") +
                    [item.replace("=", "-").replace("/", "-") for item in sets])  # fmt: skip
    return Path("runs") / "distill_gain" / f"{name}.json"


def setting_from_args(args: argparse.Namespace) -> Setting:
    setting = SETTINGS["quick" if args.quick else "cuda" if args.device == "cuda" else "default"]
    fields = {f.name for f in dataclasses.fields(Setting)}
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise UserError(f"--set {item}: unknown field {key!r}; fields: {', '.join(sorted(fields))}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, list):  # tuples, as the Setting's fields (corpus: a list of [domain, frames])
            parsed = tuple(tuple(item) if isinstance(item, list) else item for item in parsed)
        changes[key] = parsed
    setting = dataclasses.replace(setting, **changes)
    unknown = sorted(set(setting.rows) - set(ROW_OVERRIDES))
    if unknown:
        raise UserError(f"--set rows: unknown {unknown}; rows: {', '.join(ROW_OVERRIDES)}")
    if "baseline" not in setting.rows:
        raise UserError("--set rows: every row is paired with the baseline, list baseline too")
    return setting


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    try:
        report = run(setting_from_args(args), args.cache, args.device, args.stage)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    if report is None:
        return
    table = markdown(report)
    out = args.out or default_out(args.quick, args.set, args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = [f"{regime}/{name}" for regime, r in report["regimes"].items() for name, row in r["rows"].items()
              if any("status" in m for m in row["per_seed"])]  # fmt: skip
    if failed:
        raise SystemExit(f"rows failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
