"""TIE-KD: depth probability maps, the KL/SSIM loss, the pinned student bins, and training from a black-box teacher."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from distill.config import load_config
from distill.data.synth import write_world
from distill.errors import UserError
from distill.kd.alignment import top_rows_mask
from distill.kd.registry import build_method
from distill.kd.tiekd import dpm_kl, gaussian_dpm, pin_uniform_bins, teacher_dpm, tiekd_terms
from distill.models import build_student
from distill.models.base import DepthOutput
from distill.training.run import run_training

CENTERS = torch.linspace(0.5, 79.5, 80)  # 80 uniform 1 m bins over [0, 80]


class TinyDepthNet(nn.Module):
    """A fixed random conv net giving depth 2-62 m: exported to ONNX it is a black-box teacher."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 2.0 + 60.0 * torch.sigmoid(self.conv(image))


def export_onnx_teacher(path: Path) -> Path:
    """A real ONNX file (dynamic batch and size, no metadata: ImageNet input, metric output)."""
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        TinyDepthNet().eval(), torch.zeros(1, 3, 32, 64), str(path), input_names=["image"], output_names=["depth"],
        dynamic_axes={"image": axes, "depth": axes}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


def test_dpm_at_a_bin_centre_peaks_there_and_sums_to_one():
    depth = torch.tensor([[[[CENTERS[30].item(), CENTERS[2].item()]]]])  # (1, 1, 1, 2)
    dpm = gaussian_dpm(depth, CENTERS, sigma=0.5)
    assert dpm.shape == (1, 80, 1, 2)
    assert dpm.argmax(dim=1).flatten().tolist() == [30, 2]
    assert torch.allclose(dpm.sum(dim=1), torch.ones(1, 1, 2))
    # bins whose density is under the 1e-16 cut-off get exactly zero probability; symmetric around the centre
    assert dpm[0, 45, 0, 0] == 0 and dpm[0, 29, 0, 0] == pytest.approx(float(dpm[0, 31, 0, 0]))
    # inside the cut-off the softmax of densities (max 1/(sigma sqrt(2 pi)) = 0.798) is flat: e^0.798 peak vs 4 m off
    assert float(dpm[0, 30, 0, 0] / dpm[0, 34, 0, 0]) == pytest.approx(math.exp(0.7979), rel=1e-3)


def test_kl_is_zero_for_identical_maps_and_positive_otherwise():
    a = gaussian_dpm(torch.full((2, 1, 3, 3), 10.0), CENTERS, 0.5)
    b = gaussian_dpm(torch.full((2, 1, 3, 3), 14.0), CENTERS, 0.5)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    assert float(dpm_kl(a, a, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(dpm_kl(a, b, mask)) > 1.0


def test_teacher_dpm_of_a_cell_is_the_mixture_of_its_pixels():
    depth = torch.tensor([[[[10.5, 20.5], [10.5, 20.5]]]])  # one 2x2 cell, half at 10.5 m, half at 20.5 m
    dpm, cells = teacher_dpm(depth, depth > 0, CENTERS, 0.5, size=(1, 1))
    expected = 0.5 * (gaussian_dpm(depth[..., :1, :1], CENTERS, 0.5) + gaussian_dpm(depth[..., :1, 1:], CENTERS, 0.5))
    assert cells.all() and torch.allclose(dpm, expected)
    assert float((dpm[0, :, 0, 0] * CENTERS).sum()) == pytest.approx(15.5, abs=1e-3)  # expected depth = mean depth
    holes = depth.clone()
    holes[..., 1] = 0.0  # the 20.5 m pixels invalid: the cell is the 10.5 m DPM alone
    dpm, cells = teacher_dpm(holes, holes > 0, CENTERS, 0.5, size=(1, 1))
    assert torch.allclose(dpm, gaussian_dpm(depth[..., :1, :1], CENTERS, 0.5))
    _, cells = teacher_dpm(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.bool), CENTERS, 0.5, (1, 1))
    assert not cells.any()


def student_like(depth: torch.Tensor, stride: int = 2) -> DepthOutput:
    """A student output whose DPM (at 1/stride) and depth are exactly the teacher's."""
    centers = CENTERS[None].expand(depth.shape[0], -1)
    probs, _ = teacher_dpm(depth, depth > 0, centers, 0.5, (depth.shape[-2] // stride, depth.shape[-1] // stride))
    return DepthOutput(depth=depth.clone(), probs=probs, centers=centers)


def test_tiekd_loss_of_identical_depth_is_zero_and_weighted_as_the_paper():
    torch.manual_seed(0)
    teacher = 5.0 + 50.0 * torch.rand(2, 1, 16, 16)
    settings = {"sigma": 0.5, "alpha": 0.1, "weight": 10.0, "ignore_top": 0.0, "max_depth": 80.0}
    terms = tiekd_terms(student_like(teacher), teacher, teacher > 0, **settings)
    assert float(sum(terms.values())) == pytest.approx(0.0, abs=1e-5)

    other = student_like(teacher.flip(-1))
    terms = tiekd_terms(other, teacher, teacher > 0, **settings)
    target, cells = teacher_dpm(teacher, teacher > 0, other.centers, 0.5, (8, 8))
    assert float(terms["tiekd_dpm"]) == pytest.approx(10 * 0.1 * float(dpm_kl(target, other.probs, cells)), rel=1e-5)
    assert float(terms["tiekd_ssim"]) > 0


def test_ignored_top_rows_do_not_count():
    torch.manual_seed(1)
    teacher = 5.0 + 50.0 * torch.rand(1, 1, 16, 16)
    student = student_like(5.0 + 50.0 * torch.rand(1, 1, 16, 16))
    changed = teacher.clone()
    changed[..., :5, :] = 70.0  # round(0.3125 * 16) = 5 rows
    settings = {"sigma": 0.5, "alpha": 0.1, "weight": 10.0, "ignore_top": 0.3125, "max_depth": 80.0}
    a = tiekd_terms(student, teacher, teacher > 0, **settings)
    b = tiekd_terms(student, changed, changed > 0, **settings)
    assert float(a["tiekd_dpm"]) == pytest.approx(float(b["tiekd_dpm"]), rel=1e-6)
    assert float(a["tiekd_ssim"]) == pytest.approx(float(b["tiekd_ssim"]), rel=1e-6)


def test_pinned_student_bins_are_uniform_frozen_and_give_its_depth():
    student = build_student("resnet18", bins=16, min_depth=1e-3, max_depth=80.0, decoder_width=8).eval()
    pin_uniform_bins(student)
    out = student(torch.randn(2, 3, 32, 64))
    width = (80.0 - 1e-3) / 16
    assert torch.allclose(out.centers, 1e-3 + width * (torch.arange(16) + 0.5).expand(2, -1), atol=1e-4)
    assert not any(p.requires_grad for p in student.head.bins.widths.parameters())
    depth = (out.probs * out.centers[:, :, None, None]).sum(1, keepdim=True)
    assert torch.allclose(nn.functional.interpolate(depth, size=(32, 64), mode="bilinear"), out.depth, atol=1e-4)


def test_default_layout_is_the_official_kitti_recipe():
    config = load_config(None, ["kd.method=tiekd", "teacher.spec=timm:vit_tiny_patch16_224"], check_paths=False)
    student = build_student("resnet18", bins=16, decoder_width=8).eval()  # model.bins is rebuilt to kd.tiekd.bins
    method = build_method(config, student, torch.device("cpu"))
    settings = method.cfg
    assert (settings.bins, settings.sigma) == (257, 0.5)
    assert settings.ignore_top * 352 == pytest.approx(110)  # 110 of 352 rows; 40 of 128 at the synthetic size
    assert student.spec["bins"] == 257 and not any(p.requires_grad for p in student.head.bins.widths.parameters())
    with torch.no_grad():
        centers = student(torch.randn(1, 3, 32, 64)).centers[0].double()
    official = torch.linspace(1e-3, 80.0, 258, dtype=torch.float64)  # 258 linearly spaced edges
    assert centers.shape == (257,)
    assert torch.allclose(centers, (official[:-1] + official[1:]) / 2, atol=1e-4)
    mask = top_rows_mask(torch.zeros(1, 1, 352, 1216), settings.ignore_top)
    assert not mask[..., :110, :].any() and mask[..., 110:, :].all()


def test_tiekd_bins_refuse_to_rebuild_a_pretrained_head():
    student = build_student("resnet18", bins=16, decoder_width=8)
    with pytest.raises(UserError, match="kd.tiekd.bins=257 but model.weights has 16 bins"):
        pin_uniform_bins(student, 257, pretrained=True)
    pin_uniform_bins(student, None, pretrained=True)  # null keeps the model's bins
    assert student.head.bins.logits.out_channels == 16


def tiny_config(tmp_path: Path, world: Path, **sections) -> Path:
    config = {
        "run": {"name": "tiny", "out_dir": str(tmp_path / "runs"), "device": "cpu", "tensorboard": False},
        "data": {"kind": "kitti", "root": str(world), "batch_size": 2, "num_workers": 0},
        "model": {"kind": "student", "arch": "resnet18", "bins": 16, "decoder_width": 8},
        "train": {"steps": 4, "epochs": None, "lr": 1e-3, "lr_end": 1e-4, "log_every": 1, "val_every": 0},
    }  # fmt: skip
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_teacher_stays_frozen_while_the_student_trains(tmp_path):
    exp = tiny_config(tmp_path, tmp_path, kd={"method": "tiekd"}, teacher={"spec": "timm:vit_tiny_patch16_224"})
    config = load_config(exp, ["data.size=[32, 64]"], check_paths=False)
    student = build_student("resnet18", bins=16, decoder_width=8)
    method = build_method(config, student, torch.device("cpu"))
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}  # parameters and BN running stats
    student_before = [p.clone() for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for m in method.trainable_modules() for p in m.parameters() if p.requires_grad])
    method.train()
    batch = {"image": torch.rand(2, 3, 32, 64), "meta": {"name": ["a", "b"]}}
    for step in range(3):
        _, terms = method(batch, step)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    assert not method.teacher.training and set(terms) == {"tiekd_dpm", "tiekd_ssim"}
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())
    student_after = [p for p in student.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student_after))
    assert not method.extra_tensors()  # the teacher is never checkpointed


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    write_world(root, frames=6, seed=0, size=(32, 64), bag="none")
    return root


@pytest.mark.slow
def test_tiekd_trains_a_student_from_a_black_box_onnx_teacher(tmp_path, world):
    onnx_file = export_onnx_teacher(tmp_path / "teacher.onnx")
    exp = tiny_config(tmp_path, world, kd={"method": "tiekd", "tiekd": {"ignore_top": 0.25}},
                      teacher={"spec": f"onnx:{onnx_file}"}, train={"steps": 8})  # fmt: skip
    run_dir = run_training(exp)
    with (run_dir / "train.csv").open() as file:
        rows = list(csv.DictReader(file))
    losses = [float(row["loss"]) for row in rows]
    assert len(rows) == 8 and {"tiekd_dpm", "tiekd_ssim"} <= set(rows[0]) and "silog" not in rows[0]
    assert all(math.isfinite(x) for x in losses) and min(losses[-3:]) < losses[0]
    assert (run_dir / "last" / "model.safetensors").is_file() and (run_dir / "val.csv").is_file()
