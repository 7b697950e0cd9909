"""Response-KD baselines, GT filling and the shared teacher plumbing (alignment, loading, top-row masks)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from test_kd_tiekd import export_onnx_teacher, tiny_config

from distill.config import load_config
from distill.data.synth import write_world
from distill.errors import UserError
from distill.kd.alignment import align_to_reference, fit_scale_shift, top_rows_mask
from distill.kd.gtfill import fill_gt
from distill.kd.registry import build_method
from distill.kd.response import LOSSES, response_loss
from distill.kd.teacher import load_teacher
from distill.losses import silog_loss
from distill.models import build_student
from distill.models.base import DepthOutput
from distill.models.teachers.precomputed import write_precomputed
from distill.training.run import run_training


@pytest.mark.parametrize("kind", LOSSES)
def test_every_response_loss_is_zero_for_identical_maps(kind):
    torch.manual_seed(0)
    depth = 1.0 + 60.0 * torch.rand(2, 1, 16, 16)
    assert float(response_loss(kind, depth, depth.clone(), None, max_depth=80.0)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kind", LOSSES)
def test_response_losses_on_constant_maps_match_hand_values(kind):
    student, teacher = torch.full((1, 1, 12, 12), 40.0), torch.full((1, 1, 12, 12), 20.0)
    # Constant maps have no variance: SSIM = (2 * 0.5 * 0.25 + c1) / (0.5^2 + 0.25^2 + c1), c1 = 1e-4 (depth / 80)
    ssim_term = 1 - (2 * 0.5 * 0.25 + 1e-4) / (0.5**2 + 0.25**2 + 1e-4)
    mse_term = 20.0**2
    si_term = 0.5 * math.log(2.0) ** 2  # g = ln 2 everywhere: mean(g^2) - 0.5 mean(g)^2
    expected = {"ssim": ssim_term, "mse": mse_term, "si": si_term, "ssim_si": ssim_term + si_term,
                "ssim_mse": ssim_term + mse_term}  # fmt: skip
    assert float(response_loss(kind, student, teacher, None, max_depth=80.0)) == pytest.approx(expected[kind], rel=1e-5)


def test_masked_pixels_do_not_count():
    student, teacher = torch.full((1, 1, 8, 8), 10.0), torch.full((1, 1, 8, 8), 10.0)
    teacher[..., :3, :] = 70.0
    keep = top_rows_mask(teacher, 3 / 8)
    assert keep[..., :3, :].sum() == 0 and keep[..., 3:, :].all()
    assert float(response_loss("mse", student, teacher, keep, 80.0)) == 0.0
    with pytest.raises(ValueError, match="unknown response loss"):
        response_loss("l1", student, teacher, keep, 80.0)


def test_least_squares_alignment_recovers_a_known_scale_and_shift():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    scale, shift = torch.tensor([3.0, 0.5]), torch.tensor([2.0, -1.0])
    y = scale.view(-1, 1, 1, 1) * x + shift.view(-1, 1, 1, 1)
    mask = torch.rand(2, 1, 8, 8) > 0.3
    y_noisy = torch.where(mask, y, torch.full_like(y, 1e6))  # values outside the mask must not matter
    fitted_scale, fitted_shift = fit_scale_shift(x, y_noisy, mask)
    assert torch.allclose(fitted_scale, scale, atol=1e-4) and torch.allclose(fitted_shift, shift, atol=1e-4)
    # degenerate images: constant x fixes only the shift (mean y); fewer than 2 pixels is the identity
    ones = torch.ones(1, 1, 2, 2)
    constant = fit_scale_shift(ones, torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]]), ones > 0)
    assert constant[0].item() == 0.0 and constant[1].item() == pytest.approx(4.0)
    one = fit_scale_shift(x[:1], y[:1], torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    assert (one[0].item(), one[1].item()) == (1.0, 0.0)


def test_relative_teachers_are_aligned_in_their_own_space():
    depth = torch.linspace(2.0, 40.0, 64).view(1, 1, 8, 8)
    mask = torch.ones_like(depth, dtype=torch.bool)
    aligned = align_to_reference(0.1 * depth + 3.0, "relative_depth", depth, mask, (1e-3, 80.0))
    assert torch.allclose(aligned, depth, rtol=1e-4)
    disparity = 7.0 / depth + 0.2  # an affine disparity, as MiDaS-style teachers predict
    aligned = align_to_reference(disparity, "relative_disparity", depth, mask, (1e-3, 80.0))
    assert torch.allclose(aligned, depth, rtol=1e-3)
    metric = align_to_reference(depth * 3, "metric", depth, mask, (1e-3, 80.0))
    assert torch.allclose(metric, (depth * 3).clamp_max(80.0))  # metric outputs are only clamped


def test_gt_filling_replaces_exactly_the_invalid_pixels():
    gt = torch.tensor([[[[5.0, 0.0], [0.0, 8.0]]]])
    valid = gt > 0
    teacher = torch.tensor([[[[6.0, 7.0], [9.0, 10.0]]]])
    teacher_valid = torch.tensor([[[[True, True], [False, True]]]])
    filled, filled_valid = fill_gt(gt, valid, teacher, teacher_valid)
    assert filled.tolist() == [[[[5.0, 7.0], [0.0, 8.0]]]]  # labels kept, one hole filled, one left (teacher invalid)
    assert filled_valid.tolist() == [[[[True, True], [False, True]]]]


def precomputed_config(tmp_path, method: str, overrides: list[str]):
    """A config whose teacher is a precomputed folder of two 8x8 maps (frames "a" and "b")."""
    cache = tmp_path / "cache"
    maps = torch.stack([torch.full((8, 8), 12.0), torch.arange(64.0).view(8, 8) / 2 + 1])
    write_precomputed(cache, ["a", "b"], maps, "metric", max_depth=80.0)
    return load_config(None, [f"kd.method={method}", f"teacher.spec=precomputed:{cache}", *overrides])


def batch_of(depth: torch.Tensor, flips: list[bool]) -> dict:
    return {"image": torch.rand(2, 3, 8, 8), "depth": depth, "valid": depth > 0,
            "meta": {"name": ["a", "b"], "hflip": torch.tensor(flips)}}  # fmt: skip


def test_gtfill_method_trains_silog_on_the_filled_map(tmp_path):
    config = precomputed_config(tmp_path, "gtfill", ["kd.gtfill.ignore_top=0.25"])
    method = build_method(config, build_student("resnet18", bins=4, decoder_width=8), torch.device("cpu"))
    gt = torch.zeros(2, 1, 8, 8)
    gt[:, :, 4:, :] = 20.0  # bottom half labelled
    out = DepthOutput(depth=torch.full((2, 1, 8, 8), 15.0))
    terms = method.loss(batch_of(gt, [False, True]), out, step=0)
    teacher = torch.stack([torch.full((8, 8), 12.0), (torch.arange(64.0).view(8, 8) / 2 + 1).flip(-1)])[:, None]
    expected = torch.where(gt > 0, gt, teacher)
    expected[:, :, :2, :] = 0.0  # the top quarter is never filled
    assert set(terms) == {"filled_silog"}
    assert float(terms["filled_silog"]) == pytest.approx(float(silog_loss(out.depth, expected, expected > 0)))


def test_response_method_adds_the_weighted_gt_loss(tmp_path):
    config = precomputed_config(tmp_path, "response", ["kd.response.loss=mse", "kd.response.gt_weight=0.5"])
    method = build_method(config, build_student("resnet18", bins=4, decoder_width=8), torch.device("cpu"))
    gt = torch.full((2, 1, 8, 8), 12.0)
    out = DepthOutput(depth=torch.full((2, 1, 8, 8), 12.0), centers=torch.full((2, 4), 12.0))
    terms = method.loss(batch_of(gt, [False, False]), out, step=0)
    teacher_b = torch.arange(64.0).view(8, 8) / 2 + 1
    assert set(terms) == {"response_mse", "gt_silog", "gt_chamfer"}
    assert float(terms["response_mse"]) == pytest.approx(float(((teacher_b - 12.0) ** 2).sum() / 128))
    assert float(terms["gt_chamfer"]) == 0.0 and float(terms["gt_silog"]) < 1e-3


def test_teacher_loading_errors_name_the_keys(tmp_path):
    with pytest.raises(UserError, match="needs a teacher: set teacher.weights or teacher.spec"):
        load_teacher(load_config(None, ["kd.method=response"]), torch.device("cpu"))
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="weights file: also set teacher.spec"):
        load_teacher(load_config(None, ["kd.method=response", f"teacher.weights={weights}"]), torch.device("cpu"))
    with pytest.raises(UserError, match="kd.response: section missing"):
        build_method(load_config(None, ["kd.method=response", "kd.response=null"]), None, torch.device("cpu"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    write_world(root, frames=6, seed=2, size=(32, 64), bag="none")
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kd", "terms"),
    [
        ({"method": "response", "response": {"loss": "ssim_si", "gt_weight": 0.5}}, {"response_ssim_si", "gt_silog"}),
        ({"method": "gtfill"}, {"filled_silog", "filled_chamfer"}),
    ],
)
def test_baselines_train_from_an_onnx_teacher(tmp_path, world, kd, terms):
    teacher = {"spec": f"onnx:{export_onnx_teacher(tmp_path / 'teacher.onnx')}"}
    run_dir = run_training(tiny_config(tmp_path, world, kd=kd, teacher=teacher, train={"steps": 3}))
    with (run_dir / "train.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 and terms <= set(rows[0])
    assert all(math.isfinite(float(row["loss"])) for row in rows)
