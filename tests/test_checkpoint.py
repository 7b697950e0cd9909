"""Checkpoints: safetensors + state.json round trips, atomic replacement, run-folder resolution, RNG states."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from distill import checkpoint as ckpt
from distill.errors import UserError
from distill.models import build_student, load_model


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_student("resnet18", bins=8, decoder_width=16).eval()


def one_step(model) -> torch.optim.Optimizer:
    """An AdamW with real state after one step on a random batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.randn(2, 3, 32, 64)).depth.mean().backward()
    optimizer.step()
    model.eval()
    return optimizer


def test_round_trip_rebuilds_the_model_and_its_optimizer(tmp_path, student):
    optimizer = one_step(student)
    directory = ckpt.save_checkpoint(tmp_path / "run" / "last", student, {"step": 3, "config": {"a": 1}}, optimizer)
    assert sorted(p.name for p in directory.iterdir()) == [ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE]
    state = json.loads((directory / ckpt.STATE_FILE).read_text())
    assert state["step"] == 3 and state["model"] == student.spec

    model, config = load_model(tmp_path / "run")  # a run folder resolves to last/
    image = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(image).depth, student(image).depth, rtol=0, atol=0)
    assert config == {"a": 1} and not model.training

    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.load_optimizer(fresh, directory, state)
    saved, loaded = optimizer.state_dict(), fresh.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, moments in saved["state"].items():
        for name, value in moments.items():
            torch.testing.assert_close(loaded["state"][index][name], value, rtol=0, atol=0)


def test_saving_again_replaces_the_folder_and_leaves_no_temporaries(tmp_path, student):
    ckpt.save_checkpoint(tmp_path / "last", student, {"step": 1})
    ckpt.save_checkpoint(tmp_path / "last", student, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert ckpt.read_state(tmp_path / "last")["step"] == 2


def test_a_kill_between_the_two_renames_still_leaves_the_old_checkpoint(tmp_path, student):
    ckpt.save_checkpoint(tmp_path / "last", student, {"step": 4})
    (tmp_path / "last").rename(tmp_path / ".last.old")  # first rename done, second never happened
    (tmp_path / ".last.tmp").mkdir()  # a half-written new checkpoint
    found = ckpt.resolve_checkpoint(tmp_path, prefer=("last",))
    assert found == tmp_path / ".last.old" and ckpt.read_state(found)["step"] == 4
    ckpt.save_checkpoint(tmp_path / "last", student, {"step": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_run_folder_prefers_best_and_bad_paths_are_user_errors(tmp_path, student):
    ckpt.save_checkpoint(tmp_path / "last", student, {"step": 9})
    ckpt.save_checkpoint(tmp_path / "best", student, {"step": 6})
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "best"
    assert ckpt.resolve_checkpoint(tmp_path / "last" / ckpt.MODEL_FILE) == tmp_path / "last"
    with pytest.raises(UserError, match="checkpoint not found"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(UserError, match="not a checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "last" / ".." / "..")


def test_corrupt_files_are_user_errors(tmp_path, student):
    directory = ckpt.save_checkpoint(tmp_path / "last", student, {"step": 1})
    (directory / ckpt.MODEL_FILE).write_bytes(b"\x00" * 32)
    with pytest.raises(UserError, match=ckpt.MODEL_FILE):
        load_model(directory)
    (directory / ckpt.STATE_FILE).write_text("{not json")
    with pytest.raises(UserError, match="unreadable checkpoint state"):
        load_model(directory)


def test_weights_of_another_architecture_are_refused(tmp_path, student):
    directory = ckpt.save_checkpoint(tmp_path / "last", student, {"step": 1})
    other = build_student("resnet18", bins=4, decoder_width=16)
    with pytest.raises(UserError, match="cannot load it into the model"):
        ckpt.load_model_weights(other, directory)


def test_rng_states_survive_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(ckpt.capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
