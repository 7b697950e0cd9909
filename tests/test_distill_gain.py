"""benchmarks/distill_gain.py --quick: the smoke run trains a teacher and every quick row end to end and reports."""

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
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    quick = report["config"]["rows"]
    assert list(report["rows"]) == ["teacher", *(row for row in quick if row != "labelfree")]
    for name, row in report["rows"].items():
        assert METRIC_KEYS <= set(row), f"{name}: {row}"
        assert 0 < row["rmse"] < 80 and 0 <= row["d1"] <= 1
    students = [name for name in report["rows"] if name not in ("teacher", "baseline")]
    assert set(report["gap_closure"]) == set(students)
    base, teacher = report["rows"]["baseline"]["rmse"], report["rows"]["teacher"]["rmse"]
    for name in students:
        expected = (base - report["rows"][name]["rmse"]) / (base - teacher)
        assert report["gap_closure"][name] == pytest.approx(expected, abs=1e-4)
    if "labelfree" in quick:
        scored = ("before", "after", "teacher (kitti)", "teacher (label-free KD)")
        assert set(report["labelfree"]) == set(scored)
        assert all(METRIC_KEYS <= set(report["labelfree"][name]) for name in scored)
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in report["rows"])

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train:" not in again.stderr  # every run and score came from the cache
    assert json.loads(out.read_text())["rows"] == report["rows"]


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
