"""benchmarks/distill_gain.py --quick: the smoke run trains the teacher and every quick row of both regimes for each
seed end to end and reports them in the issue-19 JSON shape; only the default setting writes the committed table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3"}


@pytest.mark.slow
def test_quick_benchmark_writes_the_table_and_reuses_its_cache(tmp_path):
    out, cache = tmp_path / "distill_gain.json", tmp_path / "cache"
    command = [sys.executable, str(REPO / "benchmarks" / "distill_gain.py"), "--quick", "--threads", "1",
               "--cache", str(cache), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report) == ["teacher", "regimes", "diagnostics", "config"]
    teacher = report["teacher"]
    assert list(teacher) == ["spec", "steps", "train_frames", "metrics"] and teacher["train_frames"] > 0
    assert list(report["regimes"]) == ["supervised", "robot_logs"]
    seeds, quick = report["config"]["seeds"], report["config"]["rows"]
    for name, regime in report["regimes"].items():
        assert list(regime) == ["labelled_frames", "unlabelled_frames", "student_steps", "seeds", "teacher_rmse",
                                "rows", "paired"]  # fmt: skip
        assert regime["teacher_rmse"] == teacher["metrics"][name]["rmse"] and regime["seeds"] == seeds
        expected_rows = [row for row in quick if name == "robot_logs" or row != "labelfree"]
        assert list(regime["rows"]) == expected_rows and set(regime["paired"]) == set(expected_rows) - {"baseline"}
        for row in regime["rows"].values():
            assert len(row["per_seed"]) == len(seeds)
            for metrics in [*row["per_seed"], row["mean"]]:
                assert METRIC_KEYS <= set(metrics) and 0 < metrics["rmse"] < 80 and 0 <= metrics["d1"] <= 1
        base = [m["rmse"] for m in regime["rows"]["baseline"]["per_seed"]]
        for row, pair in regime["paired"].items():
            diffs = [m["rmse"] - b for m, b in zip(regime["rows"][row]["per_seed"], base)]
            delta = sum(diffs) / len(diffs)
            se = (sum((d - delta) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
            assert pair["delta_rmse"] == pytest.approx(delta, abs=1e-4)
            assert pair["delta_rmse_se"] == pytest.approx(se, abs=1e-4)
            gap = -delta / (regime["rows"]["baseline"]["mean"]["rmse"] - regime["teacher_rmse"])
            assert pair["gap_closure"] == pytest.approx(gap, abs=1e-3)
            assert pair["significant"] == (pair["delta_rmse"] < -2 * pair["delta_rmse_se"])
    assert report["regimes"]["supervised"]["unlabelled_frames"] == 0
    assert report["regimes"]["robot_logs"]["unlabelled_frames"] > report["regimes"]["robot_logs"]["labelled_frames"]
    disdepth = report["diagnostics"]["disdepth"]
    assert set(disdepth["ghost_advantage"]) >= {"warmup_end", "last"}
    assert all(isinstance(disdepth["ghost_advantage"][key], float) for key in ("warmup_end", "last"))
    assert len(disdepth["lam_support"]) == 4 and all(0 < v <= 1 for v in disdepth["lam_support"])
    table = out.with_suffix(".md").read_text()
    assert all(f"**{name}**" in table for name in report["regimes"]) and "| disdepth |" in table

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train:" not in again.stderr  # every run and score came from the cache
    assert json.loads(out.read_text())["regimes"] == report["regimes"]


def test_only_the_default_setting_writes_the_committed_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from distill_gain import RESULTS, default_out
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert default_out(False, []) == RESULTS
    assert default_out(False, ["student_steps=800"]) == Path("runs/distill_gain/student_steps-800.json")
    assert default_out(True, []) == Path("runs/distill_gain/quick.json")
    assert default_out(False, ["student_arch=resnet18", "seed=1"]).parent != RESULTS.parent
    assert default_out(False, [], "cuda") == Path("runs/distill_gain/cuda.json")
