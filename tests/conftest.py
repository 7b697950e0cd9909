"""Session-wide test settings: an isolated ROS 2 domain, the shared real samples, a modest thread count."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from distill.sample_data import sample_data_problem, sample_data_root

# Every test session gets its own DDS domain so parallel runs never cross-talk (see shared/docs/ros.md).
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real KITTI/NYU samples ($DEPTHKD_SAMPLE_DATA, default ../shared/data), all of SAMPLE_FILES present.

    Missing samples skip the tests that need them, except in CI ($CI=true), which always has them: there a silent
    skip would hide a broken path, so the test fails.
    """
    root = sample_data_root()
    problem = sample_data_problem(root)
    if problem and os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)
    return root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A 10-frame synthetic KITTI-layout world at 192x64 (train/val/test splits, one mcap bag per drive).

    Shared by every test that needs a small real dataset, so the world is rendered once per session.
    """
    from distill.data.synth import write_world

    root = tmp_path_factory.mktemp("synth") / "world"
    write_world(root, frames=10, seed=0, size=(64, 192), bag="mcap")
    return root
