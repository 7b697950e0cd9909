"""Training survives crashes: kills during checkpoint writes, corrupt checkpoints, and losses that turn NaN.

A checkpoint is only ever loaded once its manifest (sizes and SHA-256 in state.json, written last) checks out; the
newest complete one of last/, .last.old/ and .last.tmp/ wins, and a NaN run stops before it can save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import experiment, logged_steps, read_log, start_training, wait_for
from torch import nn

from distill import checkpoint as ckpt
from distill.cli import main
from distill.config import load_config
from distill.errors import UserError
from distill.kd.registry import build_method
from distill.models import load_model
from distill.training.trainer import NonFiniteLossError, Trainer

# Saves checkpoints step, step + 1, ... forever: weights and method tensors all equal to the step they belong to.
WRITER = """
import sys
import torch
from pathlib import Path
from torch import nn
from distill.checkpoint import save_checkpoint
folder, step = Path(sys.argv[1]), int(sys.argv[2])
model = nn.Linear(1024, 1024)
print("ready", flush=True)
while True:
    with torch.no_grad():
        model.weight.fill_(step), model.bias.fill_(step)
    save_checkpoint(folder / "last", model, {"step": step}, method_tensors={"extra": torch.full((1 << 20,), step)})
    print("saved", step, flush=True)
    step += 1
"""


def save_numbered(folder: Path, step: int) -> Path:
    """What WRITER saves at `step`, written from this process."""
    model = nn.Linear(1024, 1024)
    with torch.no_grad():
        model.weight.fill_(step), model.bias.fill_(step)
    extra = {"extra": torch.full((1 << 20,), step)}
    return ckpt.save_checkpoint(folder / "last", model, {"step": step}, method_tensors=extra)


def assert_consistent(directory: Path) -> int:
    """The step of a checkpoint whose every tensor holds that step (no file from another save mixed in)."""
    step = ckpt.verify_checkpoint(directory)["step"]
    tensors = {**load_file(directory / ckpt.MODEL_FILE), **load_file(directory / ckpt.METHOD_FILE)}
    assert all(bool((tensor == step).all()) for tensor in tensors.values()), directory
    return step


@pytest.mark.slow
def test_kills_during_checkpoint_writes_always_leave_the_newest_complete_one(tmp_path):
    """SIGKILL a process that saves in a loop, each time while a save is in flight, and restart it where it stood."""
    rng = random.Random(0)
    save_numbered(tmp_path, 0)
    step, mid_write, kills = 1, 0, 0
    while kills < 5 or (mid_write < 3 and kills < 30):  # a fast idle disk finishes many saves before the kill lands
        kills += 1
        command = [sys.executable, "-c", WRITER, str(tmp_path), str(step)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        assert writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.3))
        deadline = time.monotonic() + 30
        while not (tmp_path / ".last.tmp").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.02))  # land in a different phase of the save each time
        writer.send_signal(signal.SIGKILL)
        saved = [int(line.split()[1]) for line in writer.communicate()[0].splitlines() if line.startswith("saved")]
        mid_write += (tmp_path / ".last.tmp").exists() or (tmp_path / ".last.old").exists()
        done = saved[-1] if saved else step - 1
        found = ckpt.resolve_checkpoint(tmp_path, prefer=("last",))
        resumed = assert_consistent(found)
        assert resumed in (done, done + 1)  # the last save that returned, or one killed just after completing
        step = resumed + 1
    assert mid_write >= 3  # enough kills left a save half-done for the test to mean something
    assert assert_consistent(save_numbered(tmp_path, step)) == step
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last"]


def test_incomplete_or_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    save_numbered(tmp_path, 4)
    (tmp_path / "last").rename(tmp_path / ".last.old")  # a save killed between its two renames...
    save_numbered(tmp_path, 5)  # ...is completed by the next save, which keeps no temporaries
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last"]

    save_numbered(tmp_path / "elsewhere", 6).rename(tmp_path / ".last.tmp")  # complete, killed before its renames
    (tmp_path / "elsewhere").rmdir()
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / ".last.tmp"  # the newest complete one

    (tmp_path / ".last.tmp" / ckpt.STATE_FILE).unlink()  # killed before state.json: not a checkpoint yet
    with caplog.at_level(logging.WARNING, logger="distill.checkpoint"):
        assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "last"
    assert f"{tmp_path / '.last.tmp'}: incomplete checkpoint" in caplog.text

    model = tmp_path / "last" / ckpt.MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the weights, same size
    model.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"no complete checkpoint at {tmp_path}.*{ckpt.MODEL_FILE}: contents differ"):
        load_model(tmp_path)
    model.write_bytes(bytes(data[:-100]))
    with pytest.raises(UserError, match=r"bytes where state.json lists \d+ \(truncated\?\)"):
        ckpt.resolve_checkpoint(tmp_path / "last")

    save_numbered(tmp_path, 7)  # a new save replaces the corrupt one and cleans up
    assert assert_consistent(ckpt.resolve_checkpoint(tmp_path)) == 7
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last"]


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


@pytest.mark.slow
def test_nan_loss_stops_the_cli_and_keeps_the_last_good_checkpoint(tmp_path, synth_root, capsys):
    exp = experiment(tmp_path, synth_root, data={"val_split": None}, train={"steps": 4, "ckpt_every": 2})
    assert main(["train", str(exp)]) == 0
    last = tmp_path / "runs" / "tiny" / "last"
    good = files_of(last)
    capsys.readouterr()
    # A diverging learning rate: the weights blow up within a few steps and the loss turns NaN.
    diverge = ["resume=true", "train.steps=12", "train.lr=1e6", "train.lr_end=1e6", "train.ckpt_every=100"]
    assert main(["train", str(exp), *diverge]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # stderr also has tqdm's bar
    assert len(errors) == 1 and errors[0].startswith("distill train: error: training stopped: the loss is not finite")
    step = int(re.search(r"not finite at step (\d+) ", errors[0]).group(1))
    assert 4 < step <= 12 and "silog=nan" in errors[0] and f"last good checkpoint is kept: {last} (step 4)" in errors[0]
    assert files_of(last) == good  # never overwritten
    assert max(int(row["step"]) for row in read_log(last.parent / "train.csv")) < step  # nothing NaN logged


def test_non_finite_weights_are_never_saved(tmp_path, synth_root):
    from distill.training.run import _train_loader, build_model_from_config

    config = load_config(experiment(tmp_path, synth_root))
    method = build_method(config, build_model_from_config(config), torch.device("cpu"))
    trainer = Trainer(config, method, _train_loader(config), None, tmp_path, torch.device("cpu"))
    trainer._save("last")
    with torch.no_grad():
        next(method.student.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"weights are no longer finite.*kept: .*last \(step 0\)"):
        trainer._save("last")
    assert ckpt.verify_checkpoint(tmp_path / "last")["step"] == 0


@pytest.mark.slow
def test_kill_during_a_training_checkpoint_resumes_from_the_last_complete_one(tmp_path, synth_root):
    exp = experiment(tmp_path, synth_root, train={"steps": 10_000, "val_every": 0, "ckpt_every": 1})
    run_dir = tmp_path / "runs" / "tiny"
    first = start_training(exp)
    tmp = run_dir / ".last.tmp"

    def writing() -> bool:  # step k + 1 is being saved: its model file is there, its state.json not yet
        started = len(logged_steps(run_dir)) >= 3 and (tmp / ckpt.MODEL_FILE).exists()
        return started and not (tmp / ckpt.STATE_FILE).exists()

    wait_for(writing, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    k = json.loads((run_dir / "last" / ckpt.STATE_FILE).read_text())["step"]
    complete = {k} | ({k + 1} if (tmp / ckpt.STATE_FILE).exists() else set())  # unless the kill came a bit late
    killed_log = {int(row["step"]): row for row in read_log(run_dir / "train.csv")}
    assert k + 1 in killed_log

    second = start_training(exp, "resume=true")
    wait_for(lambda: max(logged_steps(run_dir), default=0) >= k + 2, second)
    second.send_signal(signal.SIGKILL)
    output = second.communicate()[0]
    resumed_at = int(re.search(r"resuming at step (\d+)", output).group(1))
    assert resumed_at in complete
    if resumed_at == k:
        assert f"{tmp}: incomplete checkpoint" in output  # the half-written one was skipped, with a warning
    resumed_log = {int(row["step"]): row for row in read_log(run_dir / "train.csv")}
    assert resumed_log[k + 1]["lr"] == killed_log[k + 1]["lr"]
    assert resumed_log[k + 1]["loss"] == killed_log[k + 1]["loss"]  # same weights, optimizer and data order
