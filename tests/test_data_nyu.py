"""NYU loader on the real frame in ../shared/data (mmseg layout) and on small BTS-layout and broken exports."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from distill.config import load_data_config
from distill.data import build_dataset
from distill.data.nyu import NyuDataset, nyu_intrinsics
from distill.errors import UserError


@pytest.fixture(scope="module")
def nyu(shared_data) -> Path:
    return shared_data / "nyu_sample"


def write_frame(image_path: Path, depth_path: Path, depth_mm: np.ndarray) -> np.ndarray:
    """Write a JPEG + uint16 millimetre PNG pair; returns the RGB image as written."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    depth_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros(depth_mm.shape + (3,), np.uint8)
    rgb[..., 0] = 200
    cv2.imwrite(str(image_path), rgb[..., ::-1])
    cv2.imwrite(str(depth_path), depth_mm.astype(np.uint16))
    return rgb


def test_real_frame_loads_in_metres(nyu):
    dataset = build_dataset(load_data_config({"kind": "nyu", "root": nyu}), "train", augment=False)
    assert len(dataset) == 1
    sample = dataset[0]
    raw = cv2.imread(str(nyu / "annotations" / "bookstore_0001d_00001.png"), cv2.IMREAD_UNCHANGED)
    assert sample["image"].shape == (3, 120, 160) and sample["depth"].shape == (1, 120, 160)
    depth, valid = sample["depth"][0].numpy(), sample["valid"][0].numpy()
    assert np.median(raw) / 1000 == pytest.approx(1.884)  # the published figure: median over all pixels
    # Metres, and the 10 m sensor clamp (14.7 % of pixels) is invalid under the NYU range 1e-3 < d < 10 m.
    in_range = (raw > 0) & (raw < 10_000)
    assert np.array_equal(valid, in_range)
    assert np.allclose(depth[valid], raw[valid] / 1000.0)
    assert np.median(depth[valid]) == pytest.approx(2.208, abs=0.01)
    assert depth.max() < 10.0 and not depth[~valid].any()
    assert sample["meta"]["name"] == "images/bookstore_0001d_00001"


def test_intrinsics_are_scaled_to_the_image(nyu):
    assert nyu_intrinsics(480, 640) == pytest.approx(
        np.array([[518.86, 0, 325.58], [0, 519.47, 253.74], [0, 0, 1]], np.float32)
    )
    K = NyuDataset(nyu)[0]["K"].numpy()
    assert K[0, 0] == pytest.approx(518.86 / 4) and K[1, 1] == pytest.approx(519.47 / 4)
    assert K[0, 2] == pytest.approx((325.58 + 0.5) / 4 - 0.5) and K[1, 2] == pytest.approx((253.74 + 0.5) / 4 - 0.5)


def test_bts_sync_layout_and_split_folder(tmp_path):
    depth_mm = np.full((12, 16), 2500, np.uint16)
    depth_mm[0, :4] = 0
    rgb = write_frame(tmp_path / "train" / "office_0001" / "rgb_00003.jpg",
                      tmp_path / "train" / "office_0001" / "sync_depth_00003.png", depth_mm)  # fmt: skip
    write_frame(tmp_path / "test" / "kitchen_0002" / "rgb_00000.jpg",
                tmp_path / "test" / "kitchen_0002" / "sync_depth_00000.png", depth_mm)  # fmt: skip
    dataset = build_dataset(load_data_config({"kind": "nyu", "root": tmp_path, "size": [6, 8]}), "train", augment=False)
    assert len(dataset) == 1
    sample = dataset[0]
    assert sample["meta"]["name"] == "train/office_0001/rgb_00003"
    assert sample["image"].shape == (3, 6, 8)
    assert sample["depth"][sample["valid"]].unique().tolist() == [2.5]
    assert abs(sample["image"][0].mean().item() - rgb[..., 0].mean() / 255) < 0.02
    assert sample["K"][0, 0].item() == pytest.approx(518.86 * 16 / 640 / 2)


def test_mmseg_split_subfolder(tmp_path):
    depth_mm = np.full((8, 8), 1200, np.uint16)
    write_frame(tmp_path / "images" / "test" / "a.jpg", tmp_path / "annotations" / "test" / "a.png", depth_mm)
    write_frame(tmp_path / "images" / "train" / "b.jpg", tmp_path / "annotations" / "train" / "b.png", depth_mm)
    names = [sample["meta"]["name"] for sample in NyuDataset(tmp_path, split="test")]
    assert names == ["images/test/a"]


def test_broken_exports_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no NYU frames"):
        NyuDataset(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        NyuDataset(tmp_path / "absent")
    write_frame(tmp_path / "images" / "a.jpg", tmp_path / "elsewhere" / "a.png", np.ones((4, 4)))
    with pytest.raises(UserError, match=str(tmp_path / "annotations" / "a.png")):
        NyuDataset(tmp_path)
    depth = tmp_path / "annotations" / "a.png"
    depth.parent.mkdir()
    depth.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError, match=str(depth)):
        NyuDataset(tmp_path)[0]
    cv2.imwrite(str(depth), np.ones((4, 4), np.uint8))
    with pytest.raises(UserError, match="16-bit single-channel"):
        NyuDataset(tmp_path)[0]
    cv2.imwrite(str(depth), np.ones((5, 4), np.uint16))
    with pytest.raises(UserError, match="does not match the size"):
        NyuDataset(tmp_path)[0]


def test_depth_range_from_config(nyu):
    sample = build_dataset(
        load_data_config({"kind": "nyu", "root": nyu, "min_depth": 2.0, "max_depth": None}), "test", False
    )[0]
    depth = sample["depth"][sample["valid"]]
    assert depth.min() > 2.0 and depth.max() < 10.0
    with pytest.raises(UserError, match="min_depth"):
        build_dataset(load_data_config({"kind": "nyu", "root": nyu, "min_depth": 5, "max_depth": 1}), "test", False)
    with pytest.raises(UserError, match="data.max_depth: Input should be a valid number"):
        build_dataset(load_data_config({"kind": "nyu", "root": nyu, "max_depth": "far"}), "test", False)
