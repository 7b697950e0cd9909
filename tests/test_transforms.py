"""Training transforms keep image, depth and intrinsics consistent (checked against a known 3-D scene)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.data.samples import make_sample
from distill.data.transforms import (
    ColorJitter,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    crop,
    hflip,
    resize,
    scale_intrinsics,
    training_transform,
)
from distill.errors import UserError

K0 = np.array([[60.0, 0.0, 41.3], [0.0, 58.0, 23.7], [0.0, 0.0, 1.0]])
NORMAL, OFFSET = np.array([0.1, -0.3, -0.6]), -2.0  # plane n . X = d, 2.5-5 m ahead, tilted


def plane_depth(K: np.ndarray, height: int, width: int, mirrored: bool = False) -> np.ndarray:
    """Depth (H, W) of the plane (or its left-right mirror image) through each pixel centre of a camera K."""
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T
    normal = NORMAL * [-1, 1, 1] if mirrored else NORMAL
    return (OFFSET / (rays @ normal)).astype(np.float32)


def ray_image(K: np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB whose red channel encodes the normalised ray x = (u - cx) / fx and green the ray y; uint8."""
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    red = 128 + 60 * (u - K[0, 2]) / K[0, 0]
    green = 128 + 60 * (v - K[1, 2]) / K[1, 1]
    return np.stack([red, green, np.full_like(red, 90)], -1).round().clip(0, 255).astype(np.uint8)


@pytest.fixture
def scene() -> dict:
    height, width = 48, 80
    depth = plane_depth(K0, height, width)
    depth[:5, :7] = 0.0  # an invalid corner: must stay invalid wherever it goes
    sparse = np.where(np.arange(width)[None] % 3 == 0, depth, 0.0).astype(np.float32)
    image = ray_image(K0, height, width)
    return make_sample(image, depth, K0, {"name": "plane"}, (1e-3, 80.0), sparse_depth=sparse)


def matches_plane(sample: dict, atol: float, mirrored: bool) -> bool:
    K = sample["K"].double().numpy()
    expected = plane_depth(K, *sample["depth"].shape[-2:], mirrored=mirrored)
    maps = [sample[key][0].numpy() for key in ("depth", "sparse_depth")]
    return all(np.allclose(depth[depth > 0], expected[depth > 0], atol=atol) for depth in maps)


def assert_geometry(sample: dict, atol: float = 1e-4, mirrored: bool | None = False) -> None:
    """Depth maps equal the plane (mirrored: its mirror image; None: either) rendered with the sample's own K
    wherever valid, and valid == depth > 0."""
    options = (False, True) if mirrored is None else (mirrored,)
    assert any(matches_plane(sample, atol, option) for option in options)
    assert torch.equal(sample["valid"], sample["depth"] > 0)


def test_scene_fixture_is_consistent(scene):
    assert_geometry(scene)
    assert scene["valid"].sum() == 48 * 80 - 35


def test_crop_moves_principal_point(scene):
    out = crop(scene, top=6, left=10, height=30, width=50)
    assert out["image"].shape == (3, 30, 50)
    assert out["K"][0, 2] == pytest.approx(41.3 - 10) and out["K"][1, 2] == pytest.approx(23.7 - 6)
    assert torch.equal(out["image"], scene["image"][:, 6:36, 10:60])
    assert_geometry(out)


def test_hflip_mirrors_cx_and_is_an_involution(scene):
    out = hflip(scene)
    assert out["K"][0, 2] == pytest.approx(80 - 1 - 41.3)
    assert torch.equal(out["depth"], scene["depth"].flip(-1))
    assert_geometry(out, mirrored=True)  # the flipped camera sees the mirrored scene (x -> -x)
    back = hflip(out)
    assert torch.equal(back["image"], scene["image"]) and torch.allclose(back["K"], scene["K"])


@pytest.mark.parametrize("size", [(24, 40), (96, 160), (30, 57)])
def test_resize_scales_intrinsics_and_keeps_depth_values(scene, size):
    out = resize(scene, size)
    assert out["image"].shape == (3, *size) and out["depth"].shape == (1, *size)
    # Nearest resampling: every output depth is one of the input depths (valid and invalid never mix).
    source_values = set(scene["depth"].flatten().tolist())
    assert set(out["depth"].flatten().tolist()) <= source_values
    # Depth off the plane by at most the slope over half a source pixel.
    assert_geometry(out, atol=0.05)
    # The ray image resampled bilinearly still encodes the rays of the new K (interior, away from the borders).
    K = out["K"].double().numpy()
    expected = ray_image(K, *size).astype(np.float32) / 255
    assert np.abs(out["image"].numpy().transpose(1, 2, 0) - expected)[3:-3, 3:-3].max() < 2.5 / 255


def test_scale_intrinsics_uses_pixel_centres():
    K = scale_intrinsics(torch.tensor(K0, dtype=torch.float32), 0.5, 0.25)
    assert K[0, 0] == pytest.approx(30.0) and K[1, 1] == pytest.approx(14.5)
    assert K[0, 2] == pytest.approx((41.3 + 0.5) * 0.5 - 0.5) and K[1, 2] == pytest.approx((23.7 + 0.5) * 0.25 - 0.5)


def test_color_jitter_changes_only_the_image(scene):
    out = ColorJitter(0.4, 0.4, 0.4, hue=0.05)(scene, torch.Generator().manual_seed(3))
    assert not torch.equal(out["image"], scene["image"])
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    assert out["depth"] is scene["depth"] and torch.equal(out["K"], scene["K"])


def test_random_pipeline_is_deterministic_given_a_generator(scene):
    pipeline = Compose([RandomCrop((32, 64)), RandomHorizontalFlip(), ColorJitter()])
    runs = [pipeline(scene, torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0]["image"], runs[1]["image"]) and torch.equal(runs[0]["K"], runs[1]["K"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])
    for run in runs:
        assert_geometry(run, mirrored=None)


def test_random_crop_covers_positions_and_rejects_oversize(scene):
    generator = torch.Generator().manual_seed(0)
    principal_points = {float(RandomCrop((40, 70))(scene, generator)["K"][0, 2]) for _ in range(30)}
    assert len(principal_points) > 5
    with pytest.raises(UserError, match="larger than the image"):
        RandomCrop((60, 70))(scene)
    with pytest.raises(UserError, match="crop"):
        RandomCrop((0, 70))


def test_training_transform_composition(scene):
    assert training_transform(None, None, augment=False) is None
    out = training_transform([24, 40], [16, 32], augment=True)(scene, torch.Generator().manual_seed(1))
    assert out["image"].shape == (3, 16, 32)
    assert_geometry(out, atol=0.05, mirrored=None)
    with pytest.raises(UserError, match="size"):
        training_transform([24], None, augment=False)


def test_random_flip_records_its_decision_for_cached_teacher_maps(scene):
    generator = torch.Generator().manual_seed(0)
    always, never = RandomHorizontalFlip(p=1.0), RandomHorizontalFlip(p=0.0)
    flipped = always(scene, generator)
    kept = never(scene, generator)
    assert flipped["meta"]["hflip"] is True and kept["meta"]["hflip"] is False
    assert torch.equal(flipped["image"], scene["image"].flip(-1))
    assert torch.equal(kept["image"], scene["image"])
    assert "hflip" not in scene["meta"]  # the input sample is never modified
