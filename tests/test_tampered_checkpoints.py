"""Tampered checkpoints: state.json is covered by its own digest and checked against a typed schema on every read.

A checkpoint written by a real training run is edited the way a user or an attacker would; resume, export, eval and
load_model must each answer with the same one-line error naming the file and the field, never a traceback.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import experiment
from torch import nn

from distill import checkpoint as ckpt
from distill.checkpoint_schema import TORCH_STATE_BYTES, ProgressState
from distill.cli import main
from distill.errors import UserError
from distill.models import load_model
from distill.training.run import run_training
from distill.training.trainer import Progress

Edit = Callable[[dict], None]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root) -> Path:
    """The run folder of a 2-step `distill train` run (its `last` checkpoint has every field the trainer writes)."""
    root = tmp_path_factory.mktemp("trained")
    exp = experiment(root, synth_root, data={"val_split": None}, train={"steps": 2, "ckpt_every": 2, "log_every": 0})
    return run_training(exp)


@pytest.fixture
def run(tmp_path, trained, synth_root) -> tuple[Path, Path]:
    """(experiment file, run folder): a private copy of the trained run, resumable to 3 steps."""
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(trained, run_dir)
    exp = experiment(tmp_path, synth_root, data={"val_split": None}, train={"steps": 3, "ckpt_every": 3})
    return exp, run_dir


def tamper(directory: Path, edit: Edit, *, recompute: bool = True) -> None:
    """Edit state.json in place; `recompute` also rewrites its digest, so that only the schema can catch the edit."""
    path = directory / ckpt.STATE_FILE
    state = json.loads(path.read_text())
    edit(state)
    if recompute:
        ckpt.write_state(directory, state)
    else:
        path.write_text(json.dumps(state, indent=1))


def set_key(*keys: str | int, value) -> Edit:
    def edit(state: dict) -> None:
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value

    return edit


def truncate_numpy_keys(state: dict) -> None:
    keys = state["rng"][0]["numpy"][1]
    state["rng"][0]["numpy"][1] = base64.b64encode(base64.b64decode(keys)[:1000]).decode()


def drop_param_groups(state: dict) -> None:
    del state["optimizer"]["param_groups"]


def file_outside(state: dict) -> None:
    state["files"]["../model.safetensors"] = state["files"].pop(ckpt.MODEL_FILE)


# (edit, the problem reported after "<folder>/state.json: ")
SCHEMA_CASES = {
    "progress.step a string": (
        set_key("progress", "step", value="2"),
        "progress.step: Input should be a valid integer",
    ),
    "step negative": (set_key("step", value=-1), "step: Input should be greater than or equal to 0"),
    "rng python state too short": (
        lambda state: state["rng"][0].update(python=state["rng"][0]["python"][:2]),
        "rng[0].python[2]: Field required",
    ),
    "rng of two processes, one saved": (
        lambda state: state["rng"].append(state["rng"][0]),
        "rng holds 2 states for world_size 1",
    ),
    "rng numpy keys truncated": (truncate_numpy_keys, "rng[0].numpy[1]: 2496 bytes of state expected, got 1000"),
    "config not a mapping": (set_key("config", value=["run", "data"]), "config: Input should be an object"),
    "data.size a string": (
        set_key("config", "data", "size", value="64x192"),
        "config.data.size: Input should be a valid array",
    ),
    "model spec a list": (set_key("model", value=["student", "resnet18"]), "model: Input should be an object"),
    "optimizer without param_groups": (drop_param_groups, "optimizer.param_groups: Field required"),
    "files outside the folder": (
        file_outside,
        "files: '../model.safetensors' is not the name of a file in the checkpoint folder",
    ),
}
EDITED = "contents differ from the SHA-256 it records (sha256) (corrupt)"


def resume(exp: Path, capsys) -> tuple[int, str]:
    code = main(["train", str(exp), "run.resume=true"])
    return code, capsys.readouterr().err.strip()


def export(run_dir: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    code = main(["export", str(run_dir / "last"), "--out", str(tmp_path / "export"), "--size", "64x192"])
    return code, capsys.readouterr().err.strip()


def evaluate(run_dir: Path, synth_root: Path, capsys) -> tuple[int, str]:
    code = main(["eval", str(run_dir / "last"), "--data", str(synth_root)])
    return code, capsys.readouterr().err.strip()


def expected_lines(run_dir: Path, problem: str) -> dict[str, str]:
    """The one line each entry point prints for a checkpoint whose state.json has `problem`."""
    last = run_dir / "last"
    unusable = f"no complete checkpoint at {last}: {last / ckpt.STATE_FILE}: {problem}"
    return {
        "train": f"distill train: error: run.resume: no checkpoint to resume in {run_dir} (no complete checkpoint at "
        f"{run_dir}: {last / ckpt.STATE_FILE}: {problem})",
        "export": f"distill export: error: {unusable}",
        "eval": f"distill eval: error: {unusable}",
        "load_model": unusable,
    }


def assert_refused_everywhere(exp: Path, run_dir: Path, tmp_path: Path, synth_root: Path, capsys, problem: str):
    expected = expected_lines(run_dir, problem)
    assert resume(exp, capsys) == (2, expected["train"])
    assert export(run_dir, tmp_path, capsys) == (2, expected["export"])
    assert evaluate(run_dir, synth_root, capsys) == (2, expected["eval"])
    with pytest.raises(UserError) as error:
        load_model(run_dir / "last")
    assert str(error.value) == expected["load_model"]
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_an_edited_state_is_corrupt_for_every_entry_point(run, tmp_path, synth_root, capsys):
    exp, run_dir = run
    tamper(run_dir / "last", set_key("lr", value=1.0), recompute=False)  # valid JSON, valid schema, wrong digest
    assert_refused_everywhere(exp, run_dir, tmp_path, synth_root, capsys, EDITED)


@pytest.mark.slow
@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_a_malformed_state_is_one_line_naming_the_field(run, tmp_path, synth_root, capsys, case):
    exp, run_dir = run
    edit, problem = SCHEMA_CASES[case]
    tamper(run_dir / "last", edit)
    assert_refused_everywhere(exp, run_dir, tmp_path, synth_root, capsys, problem)


@pytest.mark.slow
def test_rng_words_torch_refuses_stop_the_resume_before_training(run, capsys):
    exp, run_dir = run
    garbage = base64.b64encode(bytes(TORCH_STATE_BYTES)).decode()  # the right size, all zeros
    tamper(run_dir / "last", lambda state: state["rng"][0].update(torch=garbage))
    code, error = resume(exp, capsys)
    state_file = run_dir / "last" / ckpt.STATE_FILE
    assert (code, error) == (2, f"distill train: error: {state_file}: rng[0].torch: Invalid mt19937 state")
    assert ckpt.read_state(run_dir / "last")["step"] == 2  # nothing trained, nothing saved


@pytest.mark.slow
def test_a_checkpoint_written_before_the_digest_still_loads_and_resumes(run, capsys):
    exp, run_dir = run
    tamper(run_dir / "last", lambda state: state.pop(ckpt.STATE_DIGEST), recompute=False)
    model, config = load_model(run_dir)
    assert model.spec["arch"] == "resnet18" and config["train"]["steps"] == 2
    assert resume(exp, capsys)[0] == 0
    assert ckpt.read_state(run_dir / "last")["step"] == 3


def test_wrong_length_rng_states_are_refused_before_any_is_applied():
    state = ckpt.capture_rng()
    before = torch.get_rng_state()
    short = {**state, "torch": base64.b64encode(bytes(100)).decode()}
    with pytest.raises(UserError, match=rf"^saved: torch: {TORCH_STATE_BYTES} bytes of state expected, got 100$"):
        ckpt.restore_rng(short, origin="saved")
    with pytest.raises(UserError, match=r"^rng: numpy\[2\]: Input should be less than or equal to 624$"):
        ckpt.restore_rng({**state, "numpy": [*state["numpy"][:2], 625, 0, 0.0]})
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_an_edited_model_spec_is_one_line_naming_the_file(run, tmp_path, capsys):
    _, run_dir = run
    state_file = run_dir / "last" / ckpt.STATE_FILE
    tamper(run_dir / "last", set_key("model", "kind", value=3))
    problem = "model: model spec kind must be one of completion, student, teacher, got 3"
    assert export(run_dir, tmp_path, capsys) == (2, f"distill export: error: {state_file}: {problem}")
    tamper(run_dir / "last", lambda state: state["model"].update(kind="student", bins="x"))  # reaches the builder
    code, error = export(run_dir, tmp_path, capsys)
    assert code == 2 and error.startswith(f"distill export: error: {state_file}: model: ") and "\n" not in error
    with pytest.raises(UserError, match=rf"^{state_file}: model: "):
        load_model(run_dir)


def test_a_float16_scaler_state_is_checked(tmp_path):
    scaler = torch.amp.GradScaler("cpu")
    directory = ckpt.save_checkpoint(tmp_path / "last", nn.Linear(2, 2), {"step": 1, "scaler": scaler.state_dict()})
    assert ckpt.read_state(directory)["scaler"] == scaler.state_dict()
    tamper(directory, set_key("scaler", "_growth_tracker", value=-1))
    with pytest.raises(UserError) as error:
        ckpt.read_state(directory)
    assert (
        str(error.value)
        == f"{directory / ckpt.STATE_FILE}: scaler._growth_tracker: Input should be greater than or equal to 0"
    )


def test_the_progress_schema_has_the_fields_of_the_trainers_progress():
    assert set(ProgressState.model_fields) == {field.name for field in dataclasses.fields(Progress)}


@pytest.mark.slow
def test_optimizer_moments_of_another_shape_are_refused_on_resume(run, capsys):
    exp, run_dir = run
    path = run_dir / "last" / ckpt.OPTIMIZER_FILE
    tensors = load_file(path)
    key = next(name for name, tensor in tensors.items() if name.endswith("exp_avg") and tensor.dim() == 4)
    shape = list(tensors[key].shape)
    tensors[key] = tensors[key].flatten()
    save_file(tensors, path)
    data = path.read_bytes()
    digest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    tamper(run_dir / "last", set_key("files", ckpt.OPTIMIZER_FILE, value=digest))  # a manifest that vouches for it
    index = int(key.split(".")[1])
    assert resume(exp, capsys) == (
        2,
        f"distill train: error: {path}: exp_avg of parameter {index} has shape [{math.prod(shape)}], the parameter "
        f"{shape}",
    )
