"""DisDepth KD (distill/kd/disdepth.py): loss and LAM golden values, FAM shapes, ghost decoder and teacher freezing
through real optimiser steps, the warm-up, the ablation switches and a real `distill train` run."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from distill.checkpoint import read_state, save_checkpoint
from distill.config import load_config
from distill.data.sampling import ResumableSampler, SeededDataset
from distill.data.synth import write_world
from distill.errors import UserError
from distill.kd.disdepth import FAM, DisDepthMethod
from distill.kd.disdepth_lam import LAM, attentive_kd_loss, kd_weights, rms_normalize
from distill.kd.registry import build_method, resolve_kd
from distill.models import build_student, build_teacher, load_model
from distill.training.run import run_training
from distill.training.trainer import Trainer

SIZE = (64, 96)  # (H, W): a multiple of 32, as the students and the ViT reassemble need


def config_with(**changes):
    """config/default.yaml with kd.method=disdepth and `changes` to its kd.disdepth section."""
    overrides = ["kd.method=disdepth", *(f"kd.disdepth.{k}={v}" for k, v in changes.items())]
    config = load_config(None, overrides, check_paths=False)
    resolve_kd(config)
    return config


def tiny_student():
    return build_student("resnet18", bins=8, decoder_width=8)


def tiny_teacher(spec: str = "timm:vit_tiny_patch16_224"):
    return build_teacher(spec, img_size=SIZE, bins=8, decoder_width=8)


def tiny_method(total_steps: int = 8, **changes) -> DisDepthMethod:
    torch.manual_seed(0)
    method = DisDepthMethod(tiny_student(), tiny_teacher(), config_with(**changes))
    method.total_steps = total_steps
    return method


def random_samples(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(count):
        depth = torch.rand(1, *SIZE, generator=generator) * 40 + 2
        image = torch.rand(3, *SIZE, generator=generator)
        samples.append({"image": image, "depth": depth, "valid": depth > 0, "K": torch.eye(3), "meta": {"i": index}})
    return samples


def trainer_for(method: DisDepthMethod, tmp_path: Path, steps: int) -> tuple[Trainer, dict]:
    """A real Trainer (AdamW, clipping) around `method` and one fixed batch of 2 random samples."""
    config = load_config(None, [f"train.steps={steps}", "train.epochs=null", "data.batch_size=2", "run.device=cpu"],
                         check_paths=False)  # fmt: skip
    dataset = SeededDataset(random_samples(2), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=ResumableSampler(dataset, 0, True))
    trainer = Trainer(config, method, loader, None, tmp_path, torch.device("cpu"))
    return trainer, trainer.to_device(next(iter(loader)))


def test_attentive_loss_golden_values():
    student = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2), torch.full((1, 2, 1, 1), 3.0)]
    teacher = [torch.zeros(1, 1, 2, 2), torch.ones(1, 2, 1, 1)]
    zero = [torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)]
    one = [torch.ones(1, 1, 2, 2), torch.ones(1, 1, 1, 1)]
    assert attentive_kd_loss(student, teacher, zero).item() == 0.0
    mse = sum(F.mse_loss(s, t) for s, t in zip(student, teacher))
    assert attentive_kd_loss(student, teacher, one).item() == pytest.approx(mse.item())
    assert attentive_kd_loss(student, teacher, [None, None]).item() == pytest.approx((1 + 4 + 9 + 16) / 4 + 4)
    weights = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2), torch.ones(1, 1, 1, 1)]
    assert attentive_kd_loss(student, teacher, weights).item() == pytest.approx((1 + 64) / 4 + 4)


def test_attentive_loss_treats_teacher_and_weights_as_constants():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    weights = torch.rand(2, 1, 4, 4, requires_grad=True)
    attentive_kd_loss([student], [teacher], [weights]).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None and weights.grad is None
    with pytest.raises(ValueError, match="differ"):
        attentive_kd_loss([student], [teacher[:, :2]], [None])


def test_lam_scores_are_a_softmax_over_pixels_and_weight_the_feature():
    lam = LAM(channels=1, dim=1, temperature=None)  # the unbounded scaled dot product
    feature = torch.tensor([[1.0, 1.0], [1.0, 3.0]]).view(1, 1, 2, 2)
    with torch.no_grad():
        lam.query.weight.fill_(1 / 1.5)  # query = mean (1.5) / 1.5 = 1, keys = the pixel values
        lam.key.weight.fill_(1.0)
        lam.key.bias.zero_()
    out, scores = lam(feature)
    expected = torch.tensor([1.0, 1.0, 1.0, 3.0]).exp() / (3 * math.e + math.e**3)
    assert torch.allclose(scores.flatten(), expected)
    assert torch.allclose(out, feature * scores * 4)
    batch = torch.randn(3, 16, 5, 7)
    trained = LAM(16, 8)
    torch.nn.init.normal_(trained.query.weight)
    assert torch.allclose(trained(batch)[1].sum(dim=(1, 2, 3)), torch.ones(3))


def test_kd_weights_keep_a_unit_second_moment():
    uniform = torch.full((2, 1, 3, 4), 1 / 12)
    assert torch.allclose(kd_weights(uniform), torch.ones_like(uniform))
    peaked = torch.zeros(1, 1, 2, 2)
    peaked[0, 0, 1, 1] = 1.0  # all importance on one pixel: weight 2 there (2² / 4 = 1), 0 elsewhere
    assert torch.equal(kd_weights(peaked), torch.tensor([[0.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2))
    scores = torch.softmax(torch.randn(3, 40) * 5, dim=1).view(3, 1, 5, 8)
    assert torch.allclose(kd_weights(scores).square().mean(dim=(1, 2, 3)), torch.ones(3))


def test_rms_normalize_removes_the_per_image_scale():
    feature = torch.randn(2, 3, 4, 5)
    scaled = feature * torch.tensor([10.0, 0.1]).view(2, 1, 1, 1)
    assert torch.allclose(rms_normalize(scaled), rms_normalize(feature), atol=1e-5)
    assert torch.allclose(rms_normalize(feature).square().mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)


def test_fresh_lam_is_uniform_and_leaves_the_feature_unchanged():
    feature = torch.randn(2, 6, 3, 4)
    out, scores = LAM(6, 4)(feature)
    assert torch.allclose(scores, torch.full_like(scores, 1 / 12)) and torch.allclose(out, feature, atol=1e-6)


@pytest.mark.parametrize("spec", ["timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224"])
def test_fam_outputs_have_the_student_feature_shapes(spec):
    method = DisDepthMethod(tiny_student(), tiny_teacher(spec), config_with())
    image = torch.rand(2, 3, *SIZE)
    student = method.student(method.student.normalize(image)).features
    acclimated, weighted, scores = method.acclimate(method.teacher_features(image), [f.shape[-2:] for f in student])
    assert [a.shape for a in acclimated] == [w.shape for w in weighted] == [s.shape for s in student]
    assert [s.shape for s in scores] == [(2, 1, *f.shape[-2:]) for f in student]
    assert FAM(48, 24, head_dim=32)(torch.randn(2, 48, 4, 6), (8, 12)).shape == (2, 24, 8, 12)


def test_ghost_equals_the_student_whenever_used_and_is_never_optimised(tmp_path):
    method = tiny_method()
    trainer, batch = trainer_for(method, tmp_path, steps=3)
    ghost, head = method.ghost, method.student.head
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in ghost.parameters())
    assert all(id(p) in optimised for p in [*method.fams.parameters(), *method.lams.parameters()])
    checks = []

    def compare(module, args):
        pairs = zip([*ghost.parameters(), *ghost.buffers()], [*head.parameters(), *head.buffers()], strict=True)
        checks.append(all(torch.equal(g, s) for g, s in pairs))

    ghost.register_forward_pre_hook(compare)
    for step in range(3):
        before = [p.detach().clone() for p in head.parameters()]
        trainer.train_step(batch, step, lr=1e-2)
        assert all(p.grad is None for p in ghost.parameters())
        assert all(torch.equal(g, b) for g, b in zip(ghost.parameters(), before))  # the pre-step copy, untouched
        assert not all(torch.equal(h, b) for h, b in zip(head.parameters(), before))  # while the student moved
    assert checks == [True, True, True]


def test_teacher_stays_frozen_through_training_steps(tmp_path):
    method = tiny_method()
    trainer, batch = trainer_for(method, tmp_path, steps=3)
    frozen = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    fam_before = [p.detach().clone() for p in method.fams.parameters()]
    method.train()
    assert not method.teacher.training and method.student.training
    for step in range(3):
        trainer.train_step(batch, step, lr=1e-2)
    assert all(torch.equal(frozen[k], v) for k, v in method.teacher.state_dict().items())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(fam_before, method.fams.parameters()))


def test_kd_starts_after_the_warm_up():
    method = tiny_method(total_steps=10, warmup_fraction=0.3)
    batch = {"image": torch.rand(2, 3, *SIZE), "depth": torch.full((2, 1, *SIZE), 10.0)}
    batch["valid"] = batch["depth"] > 0
    assert method.warmup_steps == 3
    names = [set(method(batch, step)[1]) for step in (0, 2, 3, 9)]
    assert names[0] == names[1] == {"silog", "chamfer", "ghost_silog", "ghost_chamfer"}
    assert names[2] == names[3] == names[0] | {"kd"}
    assert method(batch, 3)[1]["kd"].item() > 0


def test_fam_and_lam_learn_only_from_the_ghost_path_and_the_student_only_from_its_own():
    method = tiny_method(total_steps=1, warmup_fraction=0.0)
    batch = {"image": torch.rand(2, 3, *SIZE), "depth": torch.rand(2, 1, *SIZE) * 30 + 1}
    batch["valid"] = batch["depth"] > 0
    _, terms = method(batch, 0)
    acclimation = [*method.fams.parameters(), *method.lams.parameters()]
    grads = torch.autograd.grad(terms["kd"], acclimation, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(terms["ghost_silog"], list(method.student.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    assert any(g is not None and g.any() for g in torch.autograd.grad(terms["kd"], list(method.student.parameters()),
                                                                      allow_unused=True))  # fmt: skip


def test_classic_feature_kd_switch_uses_connectors_without_a_ghost():
    method = tiny_method(total_steps=4, warmup_fraction=0.5, fam="false", lam="false")
    assert not hasattr(method, "ghost") and not hasattr(method, "fams") and method.find_unused_parameters
    batch = {"image": torch.rand(2, 3, *SIZE), "depth": torch.rand(2, 1, *SIZE) * 30 + 1}
    batch["valid"] = batch["depth"] > 0
    assert set(method(batch, 1)[1]) == {"silog", "chamfer"}
    terms = method(batch, 2)[1]
    assert set(terms) == {"silog", "chamfer", "kd"} and terms["kd"].item() > 0
    assert set(method.extra_tensors()) == {k for k in method.state_dict() if k.startswith(("connectors.", "kd_scale."))}


def test_lam_without_fam_a_missing_teacher_and_one_without_features_are_user_errors():
    with pytest.raises(UserError, match="lam: true needs fam: true"):
        config_with(fam="false")
    with pytest.raises(UserError, match="teacher.weights"):
        build_method(config_with(), tiny_student(), torch.device("cpu"))
    external = tiny_teacher()
    external.feature_channels = list  # what black-box teachers (onnx:, precomputed:) report
    with pytest.raises(UserError, match="needs a teacher with 4 stage features"):
        DisDepthMethod(tiny_student(), external, config_with())


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    write_world(root, frames=8, seed=0, size=SIZE, bag="none")
    return root


def experiment(tmp_path: Path, synth_root: Path, steps: int, **disdepth) -> Path:
    """A tiny CPU DisDepth experiment file distilling from a random-init ViT teacher checkpoint."""
    teacher_dir = save_checkpoint(tmp_path / "teacher" / "last", tiny_teacher(), {"config": {}})
    config = {
        "run": {"name": "kd", "out_dir": str(tmp_path / "runs"), "device": "cpu", "tensorboard": False},
        "data": {"kind": "kitti", "root": str(synth_root), "size": list(SIZE), "batch_size": 2, "num_workers": 0},
        "model": {"kind": "student", "arch": "resnet18", "bins": 8, "decoder_width": 8},
        "train": {"steps": steps, "epochs": None, "lr": 1e-3, "log_every": 1, "val_every": steps,
                  "ckpt_every": steps},
        "kd": {"method": "disdepth", "disdepth": {"warmup_fraction": 0.5, **disdepth}},
        "teacher": {"weights": str(teacher_dir)},
    }  # fmt: skip
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_disdepth_trains_end_to_end_and_checkpoints_fam_and_lam(tmp_path, synth_root):
    path = experiment(tmp_path, synth_root, steps=4)
    run_dir = run_training(path)
    header = (run_dir / "train.csv").read_text().splitlines()[0].split(",")
    assert {"silog", "ghost_silog", "kd"} <= set(header)
    tensors = load_file(run_dir / "last" / "method.safetensors")
    assert any(k.startswith("fams.") for k in tensors) and any(k.startswith("lams.") for k in tensors)
    assert not any(k.startswith(("ghost.", "teacher.")) for k in tensors)
    student, _ = load_model(run_dir / "last")
    assert student.spec["kind"] == "student"
    resumed = run_training(path, ["run.resume=true", "train.steps=6"])  # FAM/LAM come back from method.safetensors
    assert resumed == run_dir


@pytest.mark.slow
@pytest.mark.parametrize("acclimate", [True, False], ids=["disdepth", "feature_kd"])
def test_torchrun_two_cpu_processes_distil(tmp_path, synth_root, acclimate):
    """DDP: every trainable parameter gets a gradient (FAM/LAM through the ghost) or is declared unused (connectors
    during the warm-up), so both variants train under torchrun."""
    path = experiment(tmp_path, synth_root, steps=2, fam=acclimate, lam=acclimate)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "distill.cli", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = read_state(tmp_path / "runs" / "kd" / "last")
    assert state["world_size"] == 2 and state["step"] == 2
    assert (tmp_path / "runs" / "kd" / "last" / "method.safetensors").is_file()
