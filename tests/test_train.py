"""`distill train` on a tiny synthetic world: loss goes down, runs resume exactly, torchrun trains the same config."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill.checkpoint import read_state, resolve_checkpoint
from distill.config import load_config
from distill.data.sampling import ResumableSampler, SeededDataset, loader_workers
from distill.errors import UserError
from distill.kd.method import SupervisedMethod
from distill.models import build_student, load_model
from distill.models.base import DepthOutput
from distill.training.run import run_training
from distill.training.trainer import lr_at

REPO = Path(__file__).resolve().parents[1]


def experiment(tmp_path: Path, synth_root: Path, **sections) -> Path:
    """A tiny CPU experiment file; `sections` update the defaults below section by section."""
    config = {
        "run": {"name": "tiny", "out_dir": str(tmp_path / "runs"), "device": "cpu", "tensorboard": False},
        "data": {"kind": "kitti", "root": str(synth_root), "batch_size": 2, "num_workers": 0},
        "model": {"kind": "student", "arch": "resnet18", "bins": 16, "decoder_width": 16},
        "train": {"steps": 12, "epochs": None, "lr": 1e-3, "lr_end": 1e-4, "log_every": 1, "val_every": 6,
                  "ckpt_every": 6},
    }  # fmt: skip
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_log(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def test_lr_warms_up_then_decays_linearly_to_lr_end():
    lrs = [lr_at(step, 10, lr=1.0, lr_end=0.1, warmup_steps=2) for step in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lr_at(0, 5, lr=4e-5, lr_end=4e-6, warmup_steps=0) == 4e-5


def test_sampler_restarts_mid_epoch_where_it_stopped():
    data = list(range(10))
    sampler = ResumableSampler(data, seed=3, drop_last=True)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_position(step=5 + 3, steps_per_epoch=5, batch_size=2)  # epoch 1, 3 batches done
    assert list(sampler) == full[6:]
    sampler.set_epoch(2)
    assert sorted(sampler) == data and list(sampler) != full


def test_seeded_samples_ignore_and_keep_the_global_rng():
    class Noisy:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return (random.random(), np.random.rand(), torch.rand(1).item())

    dataset = SeededDataset(Noisy(), seed=7)
    torch.manual_seed(0)
    first = dataset[2]
    after = torch.rand(1)
    torch.manual_seed(1)
    random.seed(5)
    assert dataset[2] == first
    torch.manual_seed(0)
    dataset[3]
    assert torch.equal(torch.rand(1), after)  # drawing a sample left the global torch RNG untouched
    dataset.epoch = 1
    assert dataset[2] != first


def test_supervised_terms_are_silog_and_weighted_chamfer():
    student = build_student("resnet18", bins=4, decoder_width=16)
    method = SupervisedMethod(student, alpha=10.0, lam=0.85, chamfer_weight=0.5)
    depth = torch.full((1, 1, 4, 4), 5.0)
    batch = {"depth": depth, "valid": depth > 0}
    perfect = DepthOutput(depth=depth.clone(), centers=torch.tensor([[5.0, 5.0, 5.0, 5.0]]))
    terms = method.loss(batch, perfect, step=0)
    assert set(terms) == {"silog", "chamfer"} and float(terms["chamfer"]) == 0.0 and float(terms["silog"]) < 1e-4
    off = DepthOutput(depth=depth * 2, centers=torch.tensor([[6.0, 6.0, 6.0, 6.0]]))
    assert float(method.loss(batch, off, step=0)["chamfer"]) == pytest.approx(0.5 * 2.0)
    assert set(method.loss(batch, DepthOutput(depth=depth), step=0)) == {"silog"}


def assert_loss_went_down(run_dir: Path) -> None:
    losses = [row["loss"] for row in read_log(run_dir / "train.csv")]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


@pytest.mark.slow
def test_student_training_lowers_the_loss_and_leaves_a_complete_run(tmp_path, synth_root, capsys):
    run_dir = run_training(experiment(tmp_path, synth_root, run={"tensorboard": True}), ["train.chamfer_weight=0.1"])
    assert run_dir == tmp_path / "runs" / "tiny"
    assert_loss_went_down(run_dir)
    assert "| step 12 |" in capsys.readouterr().out  # the validation table
    assert [row["step"] for row in read_log(run_dir / "val.csv")] == [6, 12]
    assert any((run_dir / "tb").iterdir())
    assert load_config(run_dir / "config.yaml").train.steps == 12  # the resolved config, re-loadable
    state = read_state(run_dir / "last")
    assert state["step"] == 12 and state["lr"] == pytest.approx(1e-4) and state["model"]["arch"] == "resnet18"
    model, config = load_model(run_dir)
    assert config["model"]["decoder_width"] == 16 and model.spec == state["model"]
    assert read_state(run_dir / "best")["progress"]["best_step"] in (6, 12)


@pytest.mark.slow
def test_transformer_teacher_training_lowers_the_loss(tmp_path, synth_root):
    model = {"kind": "teacher", "spec": "timm:vit_tiny_patch16_224", "decoder_width": 16}
    run_dir = run_training(experiment(tmp_path, synth_root, model=model), ["data.size=[64, 192]", "val_split=null"])
    assert_loss_went_down(run_dir)
    assert read_state(run_dir / "last")["model"]["spec"] == "timm:vit_tiny_patch16_224"
    assert not (run_dir / "best").exists() and not (run_dir / "val.csv").exists()


def test_a_new_run_never_overwrites_and_resume_needs_a_checkpoint(tmp_path, synth_root, capsys):
    exp = experiment(tmp_path, synth_root)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "keep.txt").write_text("old run")
    with pytest.raises(UserError, match="run.resume: no checkpoint to resume"):
        run_training(exp, ["run.resume=true"])
    with pytest.raises(UserError, match="fewer than data.batch_size"):
        run_training(exp, ["data.batch_size=64"])
    assert (tmp_path / "runs" / "tiny-2").is_dir() and (tmp_path / "runs" / "tiny" / "keep.txt").is_file()
    assert f"is taken: this run is {tmp_path / 'runs' / 'tiny-2'}" in capsys.readouterr().out


def test_auto_workers_load_tiny_datasets_in_process():
    cores = len(os.sched_getaffinity(0))
    assert loader_workers(3, frames=10, batch_size=2) == 3 and loader_workers(0, frames=10**6, batch_size=8) == 0
    assert loader_workers("auto", frames=140, batch_size=8) == 0 and loader_workers(None, frames=49, batch_size=1) == 0
    assert loader_workers("auto", frames=10**5, batch_size=8) == max(0, min(4, cores - 1))


def test_default_amp_on_cpu_trains_in_float32_without_a_warning(tmp_path, synth_root, capsys):
    exp = experiment(tmp_path, synth_root, data={"num_workers": "auto"})
    run_dir = run_training(exp, ["train.steps=2", "train.amp=auto", "data.val_split=null", "train.log_every=1"])
    captured = capsys.readouterr()
    assert "needs CUDA" not in captured.out + captured.err
    assert load_config(run_dir / "config.yaml").train.amp == "none"


def test_epochs_count_full_batches_and_set_the_method_total(tmp_path, synth_root):
    from distill.kd.registry import build_method
    from distill.training.run import _train_loader, build_model_from_config
    from distill.training.trainer import Trainer

    config = load_config(experiment(tmp_path, synth_root), ["train.steps=null", "train.epochs=3"])
    loader = _train_loader(config)
    frames = len((synth_root / "splits" / "train.txt").read_text().splitlines())
    method = build_method(config, build_model_from_config(config), torch.device("cpu"))
    trainer = Trainer(config, method, loader, None, tmp_path, torch.device("cpu"))
    assert trainer.total_steps == method.total_steps == 3 * (frames // 2)


def start_training(exp: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "distill.cli", "train", str(exp), *overrides]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited early with {process.returncode}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("training made no progress in time")
        time.sleep(0.05)


def saved_step(run_dir: Path) -> int:
    """Step of run_dir/last; -1 while there is none, or while a save swaps it."""
    try:
        return read_state(run_dir / "last")["step"]
    except UserError:
        return -1


def logged_steps(run_dir: Path) -> list[int]:
    try:
        return [int(row["step"]) for row in read_log(run_dir / "train.csv")]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-row
        return []


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(tmp_path, synth_root):
    """Kill a run after its step-k checkpoint and a few more steps; the resumed run repeats those steps bit for bit."""
    exp = experiment(tmp_path, synth_root, train={"steps": 10_000, "val_every": 0, "ckpt_every": 4})
    run_dir = tmp_path / "runs" / "tiny"
    first = start_training(exp)
    wait_for(lambda: saved_step(run_dir) >= 0 and len(logged_steps(run_dir)) >= 7, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_log = {int(row["step"]): row for row in read_log(run_dir / "train.csv")}
    saved = read_state(resolve_checkpoint(run_dir, prefer=("last",)))  # the newest complete one, as resume takes
    k = saved["step"]
    assert k % 4 == 0 and max(killed_log) >= k and saved["lr"] == killed_log[k]["lr"]

    second = start_training(exp, "resume=true")
    # The killed run died before its step k + 4 checkpoint, so once the resumed run wrote it, it re-logged every step
    # the killed run had logged.
    wait_for(lambda: saved_step(run_dir) >= k + 4, second)
    second.send_signal(signal.SIGKILL)
    output = second.communicate()[0]
    assert f"resuming at step {k}" in output
    resumed = {int(row["step"]): row for row in read_log(run_dir / "train.csv")}
    assert sorted(resumed)[: k + 4] == list(range(1, k + 5))  # no gap, no duplicate
    assert max(killed_log) <= k + 4
    for step in range(k + 1, max(killed_log) + 1):
        assert resumed[step]["lr"] == killed_log[step]["lr"]
        assert resumed[step]["loss"] == killed_log[step]["loss"], f"step {step} differs after resume"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_write_one_checkpoint(tmp_path, synth_root):
    exp = experiment(tmp_path, synth_root, train={"steps": 4, "val_every": 4, "ckpt_every": 4, "log_every": 2})
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "distill.cli", "train", str(exp)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny"]  # both ranks agreed on one run folder
    state = read_state(tmp_path / "runs" / "tiny" / "last")
    assert state["world_size"] == 2 and state["step"] == 4 and len(state["rng"]) == 2
    assert [row["step"] for row in read_log(tmp_path / "runs" / "tiny" / "train.csv")] == [2, 4]  # rank 0 only
