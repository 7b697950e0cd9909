"""Golden-value tests of the shared losses: SILog, bins chamfer, SSIM, MSE, scale-invariant; masks and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import (
    bins_chamfer_loss,
    mse_loss,
    scale_invariant_loss,
    silog_loss,
    ssim,
    ssim_loss,
)

LN2 = math.log(2.0)


def _depth(seed: int = 0, shape=(2, 1, 16, 20)) -> torch.Tensor:
    """Random positive depth maps, metres."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 60.0 + 1.0


def _mask(seed: int = 1, shape=(2, 1, 16, 20)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.6


def test_silog_of_perfect_prediction_is_zero():
    gt = _depth()
    assert silog_loss(gt.clone(), gt, gt > 0).item() == pytest.approx(0.0, abs=1e-5)  # alpha * sqrt(eps) = 1e-5


@pytest.mark.parametrize("c", [0.5, 2.0, 3.7])
def test_silog_scale_invariance(c):
    gt = _depth()
    pred = c * gt
    assert silog_loss(pred, gt, lam=1.0).item() == pytest.approx(0.0, abs=1e-4)
    assert silog_loss(pred, gt).item() == pytest.approx(10.0 * math.sqrt(0.15) * abs(math.log(c)), rel=1e-4)


def test_silog_known_value_is_batchwise_over_all_valid_pixels():
    gt = torch.ones(2, 1, 1, 2)
    pred = torch.tensor([[[[2.0, 2.0]]], [[[1.0, 1.0]]]])  # g = ln 2 on image 0, 0 on image 1
    # over the 4 pixels: mean(g^2) = ln2^2 / 2, mean(g) = ln2 / 2 -> D = (0.5 - 0.85 / 4) ln2^2
    expected = 10.0 * math.sqrt(0.5 - 0.85 / 4) * LN2
    assert silog_loss(pred, gt, torch.ones_like(gt, dtype=torch.bool)).item() == pytest.approx(expected, rel=1e-5)


def test_silog_ignores_invalid_pixels_and_their_values():
    gt, pred, valid = _depth(0), _depth(2), _mask()
    reference = silog_loss(pred, gt, valid)
    gt2, pred2 = gt.clone(), pred.clone()
    gt2[~valid], pred2[~valid] = 0.0, float("nan")
    assert silog_loss(pred2, gt2, valid).item() == pytest.approx(reference.item(), rel=1e-6)
    # None means "every pixel with a positive label"
    assert silog_loss(pred, torch.where(valid, gt, 0.0)).item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        silog_loss,
        scale_invariant_loss,
        mse_loss,
        ssim_loss,
        lambda p, t, v: ssim_loss(p, t, v, window=7),
    ],
    ids=["silog", "si", "mse", "ssim11", "ssim7"],
)
def test_gradients_finite_at_valid_pixels_and_zero_elsewhere(loss):
    target, valid = _depth(0), _mask()
    pred = _depth(2)
    pred[~valid] = float("nan")
    pred[0, 0, 0, 0], valid[0, 0, 0, 0] = 0.0, True  # a zero prediction at a valid pixel: clamped, still finite
    pred.requires_grad_(True)
    value = loss(pred, target, valid)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[~valid] == 0).all() and pred.grad[valid].abs().sum() > 0
    twice = pred.detach().clone()
    twice[~valid] = 123.0  # other values at invalid pixels: the loss must not move
    assert loss(twice, target, valid).item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7)


def test_perfect_fit_has_finite_gradients():
    gt = _depth()
    for loss in (silog_loss, scale_invariant_loss, mse_loss, ssim_loss):
        pred = gt.clone().requires_grad_(True)
        loss(pred, gt).backward()
        assert torch.isfinite(pred.grad).all(), loss.__name__


def test_empty_mask_gives_zero_with_graph():
    pred, gt = _depth().requires_grad_(True), _depth(1)
    empty = torch.zeros_like(gt, dtype=torch.bool)
    for loss in (silog_loss, scale_invariant_loss, mse_loss, ssim_loss):
        value = loss(pred, gt, empty)
        value.backward()
        assert value.item() == 0.0, loss.__name__
    centers = torch.linspace(1, 80, 8).repeat(2, 1).requires_grad_(True)
    assert bins_chamfer_loss(centers, gt, empty).item() == 0.0


def test_an_unlabelled_sample_in_the_batch_changes_nothing():
    """A robot-log batch: sample 1 has no label (valid all False); every loss equals that of sample 0 alone and its
    gradient is finite, zero on the unlabelled sample (a few labelled frames among unlabelled ones, issue 19)."""
    pred, gt = _depth().requires_grad_(True), _depth(1)
    valid = _mask().clone()
    valid[1] = False
    for loss in (silog_loss, scale_invariant_loss, mse_loss, ssim_loss):
        value = loss(pred, gt, valid)
        (grad,) = torch.autograd.grad(value, pred)
        alone = loss(pred[:1], gt[:1], valid[:1])
        assert torch.isfinite(value) and torch.isfinite(grad).all(), loss.__name__
        assert value.item() == pytest.approx(alone.item(), rel=1e-5), loss.__name__
        assert grad[1].abs().max().item() == 0.0, loss.__name__
    centers = torch.linspace(1, 80, 8).repeat(2, 1).requires_grad_(True)
    chamfer = bins_chamfer_loss(centers, gt, valid)
    (grad,) = torch.autograd.grad(chamfer, centers)
    assert chamfer.item() == pytest.approx(bins_chamfer_loss(centers[:1], gt[:1], valid[:1]).item(), rel=1e-6)
    assert torch.isfinite(grad).all() and grad[1].abs().max().item() == 0.0


def test_scale_invariant_loss_is_eigens_half_lambda():
    target = _depth()
    # g = ln 2 everywhere: mean(g^2) - 0.5 mean(g)^2 = 0.5 ln2^2
    assert scale_invariant_loss(2 * target, target).item() == pytest.approx(0.5 * LN2**2, rel=1e-5)
    assert scale_invariant_loss(target, target).item() == pytest.approx(0.0, abs=1e-7)


def test_mse_known_value_and_mask():
    pred = torch.tensor([1.0, 2.0, 5.0]).view(1, 1, 1, 3)
    target = torch.zeros_like(pred)
    assert mse_loss(pred, target).item() == pytest.approx((1 + 4 + 25) / 3)
    valid = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    assert mse_loss(pred, target, valid).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="differs"):
        mse_loss(pred, target.view(1, 1, 3, 1))


def test_chamfer_zero_when_centres_are_the_gt_values():
    gt = torch.tensor([2.0, 5.0, 5.0, 11.0, 0.0, 2.0]).view(1, 1, 2, 3)  # 0 = no label
    centers = torch.tensor([[11.0, 2.0, 5.0]])
    assert bins_chamfer_loss(centers, gt).item() == 0.0


def test_chamfer_known_value_and_per_image_mean():
    gt = torch.tensor([[1.0, 2.0]]).view(1, 1, 1, 2)
    centers = torch.tensor([[1.0, 3.0]])
    # gt -> nearest centre: 0, 1 (mean 0.5); centre -> nearest gt: 0, 1 (mean 0.5)
    assert bins_chamfer_loss(centers, gt).item() == pytest.approx(1.0)
    # a second image without labels does not dilute the mean; a second identical image does not change it
    gt2 = torch.cat([gt, torch.zeros_like(gt)])
    assert bins_chamfer_loss(centers.repeat(2, 1), gt2).item() == pytest.approx(1.0)
    assert bins_chamfer_loss(centers.repeat(2, 1), gt.repeat(2, 1, 1, 1)).item() == pytest.approx(1.0)


def test_chamfer_matches_brute_force_with_gradients():
    gt, valid = _depth(3), _mask(4)
    centers = (torch.rand(2, 32, generator=torch.Generator().manual_seed(5)) * 80).requires_grad_(True)
    loss = bins_chamfer_loss(centers, gt, valid)
    loss.backward()
    brute = torch.stack(
        [
            ((g[v][:, None] - c[None, :]) ** 2).min(1).values.mean()
            + ((c[:, None] - g[v][None, :]) ** 2).min(1).values.mean()
            for c, g, v in zip(centers.detach(), gt, valid)
        ]
    ).mean()
    assert loss.item() == pytest.approx(brute.item(), rel=1e-5)
    assert torch.isfinite(centers.grad).all() and centers.grad.abs().sum() > 0


@pytest.mark.parametrize("window", [7, 11])
def test_ssim_of_identical_maps_is_one_and_noise_lowers_it(window):
    x = _depth() / 80.0
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    assert ssim(x, x, window=window).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, noisy, window=window).item() < 0.99
    assert ssim_loss(x * 80.0, x * 80.0, window=window).item() == pytest.approx(0.0, abs=1e-6)


def test_ssim_of_constant_maps_is_the_luminance_term():
    a, b = 0.5, 0.25
    x, y = torch.full((1, 1, 9, 12), a), torch.full((1, 1, 9, 12), b)
    c1 = 0.01**2  # zero variance everywhere, border included: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_constants_follow_the_data_range():
    x, y = _depth(0) / 80.0, _depth(1) / 80.0
    assert ssim(x * 80.0, y * 80.0, data_range=80.0).item() == pytest.approx(ssim(x, y).item(), rel=1e-4)
    assert ssim_loss(x * 80.0, y * 80.0).item() == pytest.approx(1.0 - ssim(x, y).item(), rel=1e-4)


def test_ssim_mask_ignores_values_outside_it():
    x, y, mask = _depth(0) / 80.0, _depth(1) / 80.0, _mask()
    reference = ssim(x, y, mask=mask).item()
    y2 = y.clone()
    y2[~mask] = float("nan")
    assert ssim(x, y2, mask=mask).item() == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="odd"):
        ssim(x, y, window=8)
