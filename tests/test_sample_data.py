"""Finding the real samples: $DEPTHKD_SAMPLE_DATA or shared/data beside the checkout; skip locally, fail in CI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distill.sample_data import (
    DEFAULT_ROOT,
    ENV_VAR,
    SAMPLE_FILES,
    missing_sample_files,
    sample_data_problem,
    sample_data_root,
)

REPO = Path(__file__).resolve().parents[1]
USES_SAMPLES = "def test_reads_the_samples(shared_data):\n    assert (shared_data / 'nyu_sample').is_dir()\n"


def test_the_variable_wins_and_an_unset_or_empty_one_means_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert sample_data_root() == tmp_path.resolve()
    monkeypatch.setenv(ENV_VAR, " ")
    assert sample_data_root() == DEFAULT_ROOT == REPO.parent / "shared" / "data"
    monkeypatch.delenv(ENV_VAR)
    assert sample_data_root() == DEFAULT_ROOT


def test_the_problem_names_the_folder_what_is_missing_and_the_variable(tmp_path):
    absent = tmp_path / "absent"
    problem = sample_data_problem(absent)
    assert f"at {absent} (no such folder)" in problem and ENV_VAR in problem and "nyu_sample/" in problem
    (tmp_path / SAMPLE_FILES[0]).parent.mkdir(parents=True)
    (tmp_path / SAMPLE_FILES[0]).write_text("P_rect_02: ...")
    assert missing_sample_files(tmp_path) == list(SAMPLE_FILES[1:])
    problem = sample_data_problem(tmp_path)
    assert SAMPLE_FILES[0] not in problem and all(name in problem for name in SAMPLE_FILES[1:])


def test_the_samples_beside_this_checkout_are_complete(shared_data):
    assert sample_data_problem(shared_data) is None


@pytest.mark.parametrize(("ci", "outcome"), [("", "skipped"), ("true", "errors")])
def test_missing_samples_skip_with_the_reason_except_in_ci(pytester, monkeypatch, ci, outcome):
    shutil.copy(REPO / "tests" / "conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile(test_uses_samples=USES_SAMPLES)
    monkeypatch.setenv(ENV_VAR, str(pytester.path / "nowhere"))
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_inprocess("-rsE", "-p", "no:cacheprovider")
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines([f"*real sample data not found at *nowhere (no such folder): set {ENV_VAR} to*"])
