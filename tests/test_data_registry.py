"""The dataset registry: a kind registered from one place is validated, built and evaluated by its own settings."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from distill.config import load_config, load_data_config
from distill.data import build_dataset
from distill.data.registry import DATASETS, DataConfig, register_dataset
from distill.data.samples import make_sample
from distill.errors import UserError

TOY_RANGE = (0.5, 4.0)  # metres


class ToyConfig(DataConfig):
    kind: Literal["toy"]
    frames: int = 2
    depth: float = 2.0


@pytest.fixture
def toy_kind(monkeypatch):
    """Register the `toy` kind for one test (the registry's table is restored afterwards)."""
    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))
    built = []

    @register_dataset(ToyConfig, depth_range=TOY_RANGE, eval_crop="none")
    def build_toy(data: ToyConfig, split: str, transform):
        built.append(split)
        # Depth rows at 0.25, 2 and 6 m: only the middle one lies inside the configured range.
        depth = np.repeat(np.float32([[0.25], [data.depth], [6.0]]), 8, axis=1).repeat(4, axis=0)
        samples = []
        for index in range(data.frames):
            sample = make_sample(np.zeros((12, 8, 3), np.uint8), depth, np.eye(3), {"name": f"toy/{index}"},
                                 (data.min_depth, data.max_depth))  # fmt: skip
            samples.append(transform(sample) if transform else sample)
        return samples

    return built


def test_a_registered_kind_validates_builds_and_brings_its_range_and_crop(toy_kind):
    data = load_data_config({"kind": "toy", "frames": 3, "size": [6, 4]})
    assert isinstance(data, ToyConfig) and data.frames == 3 and data.depth == 2.0
    assert (data.min_depth, data.max_depth) == TOY_RANGE and data.eval_crop == "none"
    dataset = build_dataset(data, "val", augment=False)
    assert toy_kind == ["val"] and len(dataset) == 3
    sample = dataset[0]
    assert sample["image"].shape == (3, 6, 4)  # data.size went through the common transform
    depth = sample["depth"][0].numpy()
    assert set(np.unique(depth[sample["valid"][0].numpy()])) == {2.0}  # 0.25 m and 6 m fall outside the toy range


def test_a_registered_kind_runs_through_the_whole_config(toy_kind):
    config = load_config(None, ["data.kind=toy", "data.depth=3.5"], check_paths=False)
    assert type(config.data) is ToyConfig and config.data.depth == 3.5
    assert (config.model.min_depth, config.model.max_depth) == TOY_RANGE  # null model bounds follow the kind
    with pytest.raises(UserError, match=r"data\.frames: Input should be a valid integer"):
        load_config(None, ["data.kind=toy", "data.frames=many"], check_paths=False)
    with pytest.raises(UserError, match=r"data\.framse: unknown key; did you mean 'data\.frames'"):
        load_config(None, ["data.kind=toy", "data.framse=1"], check_paths=False)
    with pytest.raises(UserError, match=r"data\.kind: unknown dataset kind 'ty'; did you mean 'toy'\? \(known: .*toy"):
        load_config(None, ["data.kind=ty"], check_paths=False)


def test_every_kind_declares_its_crop_and_range_and_registers_once(toy_kind):
    assert {
        name: (DATASETS.get(name).eval_crop, DATASETS.get(name).depth_range) for name in ("kitti", "nyu", "bag")
    } == {
        "kitti": ("garg", (1e-3, 80.0)),
        "nyu": ("nyu", (1e-3, 10.0)),
        "bag": ("garg", (1e-3, 80.0)),
    }
    with pytest.raises(ValueError, match="'toy' is registered twice"):
        register_dataset(ToyConfig, depth_range=TOY_RANGE, eval_crop="none")(lambda *args: [])

    class Untagged(DataConfig):
        pass

    with pytest.raises(ValueError, match="Untagged.kind must be Literal"):
        register_dataset(Untagged, depth_range=TOY_RANGE, eval_crop="none")
