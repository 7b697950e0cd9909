"""Distillation gain on the synthetic world: one transformer teacher, students of one architecture under each method.

Every run goes through `distill.training.run.run_training` and every score through `distill.verbs.evaluate.run_eval`
(KITTI protocol, Garg crop, no alignment) on the held-out test split, so the figures are what `distill train` / `distill
eval` give. Rows (DisDepth §3.3–3.4, TIE-KD §3, response KD of TIE-KD Table I): teacher; baseline (supervised student);
lgconv; feature_kd (classic feature KD, no acclimation); fam (FAM + ghost decoder); disdepth (FAM + LAM); tiekd;
response_* variants; gt_fill. The KD rows add LG-Conv when the setting's `kd_lgconv` is on (DisDepth Table 4 is
cumulative: +LG, +KD, +FAM, +LAM). It is off by default: at 200 random-init steps LG-Conv alone costs RMSE (lgconv row),
which would hide what each KD part adds. Label-free: the baseline student is fine-tuned by label-free KD on the
unlabeled bags of a shifted-domain world and scored on that world's test split, against the baseline itself. Its teacher
stands in for a foundation model that has seen scenes like the robot's: the kitti teacher fine-tuned
(labelfree_teacher_steps) on the labels of a second shifted-domain world (another seed: other drives and frames). No
label of the benchmarked shifted world is used; the kitti teacher itself does worse there than the student (so
distilling it could only copy its errors). Rows whose method is not in this checkout report "not available"; a failing
row is reported and does not stop the others.

    python benchmarks/distill_gain.py --quick                 # smoke run (CI), tiny sizes, a few rows
    python benchmarks/distill_gain.py                         # full table, CPU-feasible (about an hour on 2 cores)
    python benchmarks/distill_gain.py --device cuda --set student_steps=3000 --set teacher_steps=12000
Worlds, runs and scores are cached under --cache (runs keyed by their config overrides), so an interrupted benchmark
resumes; delete the cache after changing a method's code.
Gap closure = (RMSE_baseline − RMSE_row) / (RMSE_baseline − RMSE_teacher). Writes the table to --out (.json, .md);
without --out, only the default setting replaces results/distill_gain.json, --quick and --set runs go to
runs/distill_gain/<variant>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from distill.errors import UserError
from distill.kd.registry import method_names

RESULTS = Path(__file__).resolve().parent / "results" / "distill_gain.json"
METRICS = (("abs_rel", "AbsRel"), ("sq_rel", "SqRel"), ("rmse", "RMSE"), ("d1", "δ1"))


@dataclass(frozen=True)
class Setting:
    """Sizes and lengths of one benchmark scale (every field is recorded in the JSON `config`)."""

    size: tuple[int, int]  # [H, W] pixels, rendered and trained at
    frames: int  # frames of the kitti-domain world (~70/15/15 % train/val/test by drive)
    shifted_frames: int  # frames of the shifted-domain world (its bags feed label-free KD)
    teacher_spec: str
    teacher_steps: int
    teacher_width: int  # decoder width of the teacher
    teacher_lr: float
    student_arch: str  # random-init timm CNN
    student_steps: int  # every student row trains this many steps
    student_width: int  # decoder width of the students (limited capacity)
    student_lr: float
    labelfree_steps: int
    labelfree_teacher_steps: int  # fine-tuning of the teacher on a second shifted world (0: the kitti teacher as is)
    batch: int
    bins: int
    kd_lgconv: bool  # KD rows use LG-Conv (cumulative ablation as in DisDepth Table 4)
    kd_weight: float  # λ of the DisDepth rows (kd.disdepth.weight)
    rows: tuple[str, ...]


ALL_ROWS = ("baseline", "lgconv", "feature_kd", "fam", "disdepth", "tiekd", "response_ssim", "response_mse",
            "response_si", "response_ssim_si", "response_ssim_mse", "gt_fill", "labelfree")  # fmt: skip
SETTINGS = {
    "quick": Setting(size=(32, 96), frames=14, shifted_frames=6, teacher_spec="timm:vit_tiny_patch16_224",
                     teacher_steps=16, teacher_width=16, teacher_lr=1e-3, student_arch="resnet18", student_steps=6,
                     student_width=16, student_lr=1e-3, labelfree_steps=4, labelfree_teacher_steps=4, batch=2,
                     bins=16, kd_lgconv=False, kd_weight=0.05,
                     rows=("baseline", "feature_kd", "fam", "disdepth", "tiekd", "response_ssim", "gt_fill",
                           "labelfree")),
    "default": Setting(size=(64, 192), frames=480, shifted_frames=80,
                       teacher_spec="timm:swin_tiny_patch4_window7_224", teacher_steps=1500, teacher_width=64,
                       teacher_lr=4e-4, student_arch="efficientnet_b0", student_steps=200, student_width=32,
                       student_lr=1e-3, labelfree_steps=150, labelfree_teacher_steps=500, batch=8, bins=64,
                       kd_lgconv=False, kd_weight=0.05, rows=ALL_ROWS),
}  # fmt: skip
# Overrides of each student row on top of the common student config; H11's methods keep their defaults.
ROW_OVERRIDES = {
    "baseline": [],
    "lgconv": ["model.lgconv=true"],
    "feature_kd": ["kd.method=disdepth", "kd.disdepth.fam=false", "kd.disdepth.lam=false"],
    "fam": ["kd.method=disdepth", "kd.disdepth.lam=false"],
    "disdepth": ["kd.method=disdepth"],
    "tiekd": ["kd.method=tiekd"],
    "response_ssim": ["kd.method=response", "kd.response.loss=ssim"],
    "response_mse": ["kd.method=response", "kd.response.loss=mse"],
    "response_si": ["kd.method=response", "kd.response.loss=si"],
    "response_ssim_si": ["kd.method=response", "kd.response.loss=ssim_si"],
    "response_ssim_mse": ["kd.method=response", "kd.response.loss=ssim_mse"],
    "gt_fill": ["kd.method=gtfill"],
    "labelfree": ["kd.method=labelfree"],
}
KD_ROWS = ("feature_kd", "fam", "disdepth")


def method_available(overrides: list[str]) -> str | None:
    """None when this checkout has the row's KD method (a registered file of distill/kd/), else why not."""
    method = next((o.split("=", 1)[1] for o in overrides if o.startswith("kd.method=")), "none")
    if method in method_names():
        return None
    return f"kd.method={method}: no file of distill/kd/ registers it"


class Bench:
    """Worlds, runs and scores under `cache/`: worlds keyed by their arguments, runs by their overrides."""

    def __init__(self, setting: Setting, cache: Path, device: str) -> None:
        self.setting, self.device, self.cache = setting, device, cache
        height, width = setting.size
        self.world = cache / "worlds" / f"kitti-{height}x{width}-{setting.frames}"
        self.shifted = cache / "worlds" / f"shifted-{height}x{width}-{setting.shifted_frames}"
        self.teacher_shifted = cache / "worlds" / f"shifted-seed1-{height}x{width}-{setting.shifted_frames}"
        self.run_dirs: dict[str, Path] = {}

    def make_worlds(self, labelfree: bool) -> None:
        """Render the kitti-domain world (and the shifted one with bags when label-free runs) unless cached."""
        from distill.data.synth import write_world

        worlds = [(self.world, self.setting.frames, "kitti", "none", 0)]
        if labelfree:
            worlds.append((self.shifted, self.setting.shifted_frames, "shifted", "mcap", 0))
            if self.setting.labelfree_teacher_steps:
                worlds.append((self.teacher_shifted, self.setting.shifted_frames, "shifted", "none", 1))
        for folder, frames, domain, bag, seed in worlds:
            if not (folder / ".complete").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                write_world(folder, frames=frames, seed=seed, domain=domain, size=self.setting.size, bag=bag)
                (folder / ".complete").touch()

    def common(self, steps: int, lr: float, root: Path | None = None) -> list[str]:
        """Overrides shared by every run: data (the kitti-domain world unless `root`), length, logging."""
        height, width = self.setting.size
        return [f"run.device={self.device}", "run.tensorboard=false", "run.seed=0", "data.kind=kitti",
                f"data.root={root or self.world}", f"data.size=[{height}, {width}]",
                f"data.batch_size={self.setting.batch}", "data.num_workers=0", "data.val_split=null",
                f"train.steps={steps}", "train.epochs=null", f"train.lr={lr}", f"train.lr_end={lr / 10}",
                f"train.warmup_steps={max(steps // 20, 1)}", "train.log_every=50", "train.val_every=0",
                f"train.ckpt_every={max(steps // 4, 1)}", f"model.bins={self.setting.bins}"]  # fmt: skip

    def teacher_overrides(
        self, steps: int | None = None, lr: float | None = None, root: Path | None = None
    ) -> list[str]:
        """The teacher's run: teacher_steps at teacher_lr on the kitti-domain world unless given."""
        s = self.setting
        return [*self.common(steps or s.teacher_steps, lr or s.teacher_lr, root), "model.kind=teacher",
                f"model.spec={s.teacher_spec}", f"model.decoder_width={s.teacher_width}"]  # fmt: skip

    def labelfree_teacher_overrides(self) -> list[str]:
        """The kitti teacher fine-tuned on the labels of the second (seed 1) shifted-domain world."""
        s = self.setting
        tuning = self.teacher_overrides(s.labelfree_teacher_steps, s.teacher_lr / 2, self.teacher_shifted)
        return [*tuning, f"model.weights={self.run_dirs['teacher']}"]

    def student_overrides(self, row: str) -> list[str]:
        s = self.setting
        steps = s.labelfree_steps if row == "labelfree" else s.student_steps
        base = [*self.common(steps, s.student_lr), "model.kind=student", f"model.arch={s.student_arch}",
                f"model.decoder_width={s.student_width}"]  # fmt: skip
        if any(o.startswith("kd.method=") for o in ROW_OVERRIDES[row]):
            teacher = "labelfree_teacher" if row == "labelfree" and "labelfree_teacher" in self.run_dirs else "teacher"
            base.append(f"teacher.weights={self.run_dirs[teacher]}")
        if row in KD_ROWS:
            base += [f"kd.disdepth.weight={s.kd_weight}", *(["model.lgconv=true"] if s.kd_lgconv else [])]
        if row == "labelfree":
            base += self.labelfree_data()
        return [*base, *ROW_OVERRIDES[row]]

    def labelfree_data(self) -> list[str]:
        """Unlabeled shifted-domain bags of the training drives, starting from the trained baseline student."""
        lines = (self.shifted / "splits" / "train.txt").read_text().splitlines()
        drives = {line.split()[0].split("/")[1] for line in lines if line.strip()}
        bags = sorted(str(p) for p in (self.shifted / "bags").iterdir() if f"{p.name}_sync" in drives)
        return ["data.kind=bag", f"data.bags={json.dumps(bags)}", f"model.weights={self.run_dirs['baseline']}"]

    def train(self, name: str, overrides: list[str]) -> Path:
        """Train (or resume, or reuse) run `name` with `overrides`; its folder is keyed by the overrides."""
        from distill.checkpoint import read_state
        from distill.training.run import run_training

        key = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
        run_dir = self.cache / "runs" / f"{name}-{key}"
        self.run_dirs[name] = run_dir
        steps = int(next(o for o in overrides if o.startswith("train.steps=")).split("=")[1])
        last = run_dir / "last" / "state.json"
        if last.is_file() and read_state(last.parent)["step"] >= steps:
            return run_dir
        resume = ["run.resume=true"] if last.is_file() else []
        return run_training(None, [*overrides, f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *resume])

    def score(self, run_dir: Path, world: Path) -> dict[str, float]:
        """Test-split metrics of a run's last checkpoint on `world` (cached in the run folder)."""
        from distill.verbs.evaluate import run_eval

        path = run_dir / f"score-{world.name}.json"
        if not path.is_file():
            metrics = run_eval(run_dir / "last", world, crop="garg", align="none")
            path.write_text(json.dumps(metrics))
        return json.loads(path.read_text())


def run_row(bench: Bench, row: str) -> dict:
    """Train and score one student row; {"status": ...} instead of metrics when it cannot run."""
    overrides = bench.student_overrides(row)
    missing = method_available(overrides)
    if missing:
        return {"status": "not available", "reason": missing}
    try:
        run_dir = bench.train(row, overrides)
        world = bench.shifted if row == "labelfree" else bench.world
        metrics = bench.score(run_dir, world)
    except Exception as error:  # one broken method must not cost the other rows
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    return metrics


def gap_closure(rows: dict[str, dict]) -> dict[str, float]:
    """(RMSE_baseline − RMSE_row) / (RMSE_baseline − RMSE_teacher) for every scored student row."""
    base, teacher = rows["baseline"].get("rmse"), rows["teacher"].get("rmse")
    if base is None or teacher is None or base == teacher:
        return {}
    return {
        name: round((base - row["rmse"]) / (base - teacher), 4)
        for name, row in rows.items()
        if name not in ("teacher", "baseline") and "rmse" in row
    }


def markdown(report: dict) -> str:
    """The result table (AbsRel, SqRel, RMSE, δ1, gap closure per row) and the label-free comparison."""
    c = report["config"]
    height, width = c["size"]
    lines = [f"Teacher {c['teacher_spec']} ({c['teacher_steps']} steps); students {c['student_arch']} "
             f"({c['student_steps']} steps, LG-Conv in the DisDepth ablation rows: {c['kd_lgconv']}); "
             f"{height}x{width} synthetic KITTI-like world; {c['protocol']}.", ""]  # fmt: skip
    header = "| row | " + " | ".join(title for _, title in METRICS)
    lines += [header + " | gap closure |", "|---|" + "---:|" * (len(METRICS) + 1)]
    for name, row in report["rows"].items():
        gap = report["gap_closure"].get(name)
        lines.append(_table_row(name, row) + (f" {gap:+.1%} |" if gap is not None else "  |" * ("rmse" in row)))
    free = report.get("labelfree")
    if free:
        lines += ["", "Label-free KD on the shifted domain (its test split):", "", header + " |",
                  "|---|" + "---:|" * len(METRICS), *(_table_row(name, row) for name, row in free.items())]  # fmt: skip
    return "\n".join(lines)


def _table_row(name: str, row: dict) -> str:
    if "rmse" not in row:
        return f"| {name} | {row['status']}: {row['reason']} |"
    return f"| {name} | " + " | ".join(f"{row[key]:.4f}" for key, _ in METRICS) + " |"


def run(setting: Setting, cache: Path, device: str) -> dict:
    """The whole benchmark for one setting; returns the report."""
    bench = Bench(setting, cache, device)
    wants_labelfree = "labelfree" in setting.rows and method_available(ROW_OVERRIDES["labelfree"]) is None
    bench.make_worlds(labelfree=wants_labelfree)
    started = time.perf_counter()
    teacher_dir = bench.train("teacher", bench.teacher_overrides())
    rows: dict[str, dict] = {"teacher": bench.score(teacher_dir, bench.world)}
    for row in (r for r in setting.rows if r != "labelfree"):
        rows[row] = run_row(bench, row)
        print(f"{row}: {rows[row].get('rmse', rows[row].get('status'))}")
    report = {"rows": rows, "gap_closure": gap_closure(rows)}
    if "labelfree" in setting.rows:
        missing = method_available(ROW_OVERRIDES["labelfree"])
        if missing:  # no shifted world was rendered either
            unavailable = {"status": "not available", "reason": missing}
            report["labelfree"] = {"before": unavailable, "after": unavailable}
        else:
            before = bench.score(bench.run_dirs["baseline"], bench.shifted)
            teachers = {"teacher (kitti)": bench.score(teacher_dir, bench.shifted)}
            if setting.labelfree_teacher_steps:
                labelfree_teacher = bench.train("labelfree_teacher", bench.labelfree_teacher_overrides())
                teachers["teacher (label-free KD)"] = bench.score(labelfree_teacher, bench.shifted)
            report["labelfree"] = {"before": before, "after": run_row(bench, "labelfree"), **teachers}
    report["config"] = {
        **dataclasses.asdict(setting), "device": device, "cache": str(cache), "row_overrides": ROW_OVERRIDES,
        "protocol": "KITTI metrics, Garg crop, no alignment, depth 1e-3..80 m, test split of the synthetic world",
        "notes": "teacher and students from random init (no pretrained weights); the teacher trains "
                 "teacher_steps steps with a wider decoder, each student student_steps steps with a narrow one",
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few steps, a few rows")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache"), help="worlds, runs and scores")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report, the table beside it as .md (default: results/distill_gain.json for the "
                             "default setting; runs/distill_gain/<variant>.json with --quick or --set)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Setting field (YAML value), e.g. --set student_steps=800")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def default_out(quick: bool, sets: list[str]) -> Path:
    """Where a run writes without --out: only the default setting replaces the committed table; a smoke run or a
    --set variant goes to runs/distill_gain/, named after what it changed, so it never overwrites it."""
    if not quick and not sets:
        return RESULTS
    name = "_".join(["quick"] * quick + [item.replace("=", "-").replace("/", "-") for item in sets])
    return Path("runs") / "distill_gain" / f"{name}.json"


def setting_from_args(args: argparse.Namespace) -> Setting:
    setting = SETTINGS["quick" if args.quick else "default"]
    fields = {f.name for f in dataclasses.fields(Setting)}
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise UserError(f"--set {item}: unknown field {key!r}; fields: {', '.join(sorted(fields))}")
        parsed = yaml.safe_load(value)
        changes[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    setting = dataclasses.replace(setting, **changes)
    unknown = sorted(set(setting.rows) - set(ALL_ROWS))
    if unknown:
        raise UserError(f"--set rows: unknown {unknown}; rows: {', '.join(ALL_ROWS)}")
    if "labelfree" in setting.rows and "baseline" not in setting.rows:
        raise UserError("--set rows: labelfree fine-tunes the baseline student, list baseline too")
    return setting


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        report = run(setting_from_args(args), args.cache, args.device)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    table = markdown(report)
    out = args.out or default_out(args.quick, args.set)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = [name for name, row in report["rows"].items() if row.get("status") == "failed"]
    if failed:
        raise SystemExit(f"rows failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
