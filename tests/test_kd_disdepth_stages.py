"""DisDepth fixes (distill/kd/disdepth.py, disdepth_lam.py): bounded LAM support, the eval-mode ghost, the KD scale
rule, the acclimation stage and the diagnostics the benchmark records."""

from __future__ import annotations

import pytest
import torch
from test_kd_disdepth import SIZE, config_with, tiny_method, trainer_for

from distill.errors import UserError
from distill.kd.disdepth import gradient_norm
from distill.kd.disdepth_lam import LAM, effective_support


def spiked_feature() -> torch.Tensor:
    """(1, 8, 12, 16) small noise with one huge-valued pixel, the input that made the unbounded LAM one-hot."""
    feature = torch.randn(1, 8, 12, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    feature[0, :, 5, 7] = 1e4
    return feature


def trained_lam(temperature: float | None) -> LAM:
    torch.manual_seed(0)
    lam = LAM(8, 4, temperature)
    with torch.no_grad():  # a grown query, as training makes it (the unbounded logits scale with it)
        lam.query.weight.normal_(std=10.0)
        lam.key.weight.copy_(lam.query.weight.T.reshape(4, 8, 1, 1))
    return lam


def test_bounded_lam_support_stays_away_from_one_hot_on_a_spike():
    feature = spiked_feature()
    with torch.no_grad():
        collapsed = effective_support(trained_lam(None)(feature)[1])
        bounded = effective_support(trained_lam(0.5)(feature)[1])
    assert collapsed.item() < 2 / (12 * 16)  # unbounded: all weight on the spike
    assert bounded.item() >= 0.18  # the guaranteed floor at τ = 0.5 (module docstring)
    for _ in range(5):  # any features, any query: the floor holds
        lam = trained_lam(0.5)
        with torch.no_grad():
            scores = lam(torch.randn(3, 8, 9, 11) * 100)[1]
        assert (effective_support(scores) >= 0.18).all()


def test_effective_support_of_uniform_and_one_hot_scores():
    uniform = torch.full((2, 1, 4, 5), 1 / 20)
    assert torch.allclose(effective_support(uniform), torch.ones(2))
    one_hot = torch.zeros(1, 1, 4, 5)
    one_hot[0, 0, 2, 3] = 1
    assert effective_support(one_hot).item() == pytest.approx(1 / 20)


def test_fresh_bounded_lam_is_uniform_and_gets_a_finite_query_gradient():
    lam = LAM(6, 4, temperature=0.5)
    out, scores = lam(torch.randn(2, 6, 3, 5))
    assert torch.allclose(scores, torch.full_like(scores, 1 / 15))
    (out.square().sum() + scores[:, :, 0, 0].sum()).backward()
    assert torch.isfinite(lam.query.weight.grad).all() and lam.query.weight.grad.abs().sum() > 0


def test_method_reports_lam_support_per_level_at_least_the_floor():
    method = tiny_method(total_steps=4, warmup_fraction=0.0)
    assert method.lam_support() == []
    batch = {"image": torch.rand(2, 3, *SIZE), "depth": torch.rand(2, 1, *SIZE) * 30 + 1}
    batch["valid"] = batch["depth"] > 0
    method(batch, 0)
    support = method.lam_support()
    assert len(support) == 4 and all(0.18 <= s <= 1.0 for s in support)


def test_rms_normalisation_is_on_only_where_the_ghost_leaves_the_target_scale_free():
    assert config_with().kd.disdepth.normalizes is False  # eval ghost: the student's BN statistics pin the scale
    assert config_with(ghost_mode="train").kd.disdepth.normalizes is True
    assert config_with(normalize="true").kd.disdepth.normalizes is True
    assert config_with(ghost_mode="train", normalize="false").kd.disdepth.normalizes is False


def test_eval_ghost_gets_no_update_and_its_bn_statistics_follow_only_the_student(tmp_path):
    method = tiny_method()
    trainer, batch = trainer_for(method, tmp_path, steps=3)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in method.ghost.parameters())
    method.train()
    assert not method.ghost.training and method.student.head.training
    for step in range(3):
        trainer.train_step(batch, step, lr=1e-2)
        assert all(p.grad is None for p in method.ghost.parameters())
        # the copy taken this step is untouched by the ghost's forward: its statistics are the student's
        assert all(torch.equal(g, s) for g, s in zip(method.ghost.buffers(), method.student.head.buffers()))


def test_train_mode_ghost_moves_its_bn_statistics_with_the_fam_outputs(tmp_path):
    method = tiny_method(ghost_mode="train")
    trainer, batch = trainer_for(method, tmp_path, steps=1)
    method.train()
    trainer.train_step(batch, 0, lr=1e-2)
    assert method.ghost.training
    pairs = zip(method.ghost.buffers(), method.student.head.buffers())
    assert not all(torch.equal(g, s) for g, s in pairs if g.is_floating_point())


def test_acclimation_freezes_the_student_and_the_ghost_while_fam_and_lam_train(tmp_path):
    method = tiny_method(total_steps=6, warmup_fraction=0.0, acclimation_steps=3)
    trainer, batch = trainer_for(method, tmp_path, steps=6)
    method.train()
    student = {k: v.clone() for k, v in method.student.state_dict().items()}
    fams = [p.detach().clone() for p in method.fams.parameters()]
    for step in range(3):
        terms = trainer.train_step(batch, step, lr=1e-2)
        assert set(terms) == {"ghost_silog", "ghost_chamfer"}
    assert all(torch.equal(student[k], v) for k, v in method.student.state_dict().items())  # BN stats included
    ghost = dict(zip(method.student.head.state_dict(), method.ghost.state_dict().values()))
    assert all(torch.equal(ghost[k], student[f"head.{k}"]) for k in ghost)  # a fixed copy of the frozen decoder
    assert not all(torch.equal(a, b) for a, b in zip(fams, method.fams.parameters()))
    assert "kd" in trainer.train_step(batch, 3, lr=1e-2)
    assert not all(torch.equal(student[k], v) for k, v in method.student.state_dict().items())


def test_acclimation_leaving_no_distillation_step_is_a_user_error():
    method = tiny_method(total_steps=4, warmup_fraction=0.5, acclimation_steps=2)
    batch = {"image": torch.rand(2, 3, *SIZE), "depth": torch.rand(2, 1, *SIZE) * 30 + 1}
    batch["valid"] = batch["depth"] > 0
    with pytest.raises(UserError, match="leave no distillation step"):
        method(batch, 0)


@pytest.mark.parametrize("fam", ["true", "false"], ids=["disdepth", "feature_kd"])
def test_auto_scale_gives_the_configured_gradient_fraction_and_stays_frozen(fam):
    method = tiny_method(total_steps=4, warmup_fraction=0.5, kd_fraction=0.3, fam=fam, lam=fam)
    batch = {"image": torch.rand(2, 3, *SIZE), "depth": torch.rand(2, 1, *SIZE) * 30 + 1}
    batch["valid"] = batch["depth"] > 0
    assert method.diagnostics()["kd_scale"] is None
    assert all(torch.isfinite(v).all() for v in method.extra_tensors().values())  # checkpointable before it is set
    _, terms = method(batch, 2)
    params = [p for p in method.student.parameters() if p.requires_grad]
    task = gradient_norm(terms["silog"] + terms["chamfer"], params)
    kd = gradient_norm(terms["kd"], params)
    assert kd.item() == pytest.approx(0.3 * task.item(), rel=1e-4)
    scale = method.diagnostics()["kd_scale"]
    assert scale > 0
    other = {"image": torch.rand(2, 3, *SIZE), "depth": batch["depth"], "valid": batch["valid"]}
    method(other, 3)
    assert method.diagnostics()["kd_scale"] == scale  # frozen after the first distillation step
    assert method.extra_tensors()["kd_scale.value"].item() == pytest.approx(scale)  # saved with the method


def test_weight_scale_is_the_plain_factor():
    method = tiny_method(total_steps=2, warmup_fraction=0.0, scale="weight", weight=0.25)
    batch = {"image": torch.rand(2, 3, *SIZE), "depth": torch.rand(2, 1, *SIZE) * 30 + 1}
    batch["valid"] = batch["depth"] > 0
    kd = method(batch, 0)[1]["kd"]
    unit = tiny_method(total_steps=2, warmup_fraction=0.0, scale="weight", weight=1.0)(batch, 0)[1]["kd"]
    assert kd.item() == pytest.approx(0.25 * unit.item(), rel=1e-5)
    assert method.diagnostics()["kd_scale"] == 0.25


def test_diagnostics_record_the_ghost_advantage_at_the_end_of_warm_up_and_the_last_step(tmp_path):
    method = tiny_method(total_steps=4, warmup_fraction=0.5)
    trainer, batch = trainer_for(method, tmp_path, steps=4)
    method.train()
    assert method.diagnostics()["ghost_advantage"] == {"warmup_end": None, "last": None}
    silogs = []
    for step in range(4):
        terms = trainer.train_step(batch, step, lr=1e-3)
        silogs.append((terms["silog"].item(), terms["ghost_silog"].item()))
    diagnostics = method.diagnostics()
    for key, index in (("warmup_end", 1), ("last", 3)):
        student, ghost = silogs[index]
        assert diagnostics["student_silog"][key] == pytest.approx(student)
        assert diagnostics["ghost_silog"][key] == pytest.approx(ghost)
        assert diagnostics["ghost_advantage"][key] == pytest.approx(student - ghost)
    assert len(diagnostics["lam_support"]) == 4
