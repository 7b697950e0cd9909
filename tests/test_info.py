"""`distill info`: exact parameter counts, FLOPs against the convolution formula, the printed table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.cli import main
from distill.errors import UserError
from distill.models.info import count_flops, count_parameters, flops_by_module, info_table, model_parts


def test_count_parameters_exact():
    linear = nn.Linear(8, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), linear, linear)  # shared layer counted once
    assert count_parameters(model) == (3 * 8 * 9 + 8) + (8 + 8) + (8 * 2 + 2)
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == (8 + 8) + (8 * 2 + 2)


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_flops_match_the_formula(groups):
    conv = nn.Conv2d(3, 12, 3, stride=2, padding=1, groups=groups)
    out_h, out_w = 16, 24  # from a 32x48 input at stride 2
    macs = 12 * out_h * out_w * (3 // groups) * 3 * 3
    assert count_flops(conv, (32, 48)) == 2 * macs / 1e9


def test_flops_split_by_part_and_leave_mode_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    flops = flops_by_module(model, (8, 8))
    assert flops["0"] == 2 * 3 * 4 * 64 and flops["2"] == 2 * 4 * 2 * 64
    assert flops[""] == flops["0"] + flops["2"] and model.training


class Bypass(nn.Module):
    """Calls `body` through `.forward` (no module hooks, like timm's forward_intermediates) and a bare matmul."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = self.head(self.body.forward(x))
        return y.flatten(1) @ torch.ones(y[0].numel(), 2)


def test_table_attributes_unhooked_parts_and_functional_ops():
    rows = {name: gflops * 1e9 for name, _, gflops in info_table(Bypass(), (4, 4))}
    assert rows["body"] == pytest.approx(2 * 16 * (3 * 4 + 4 * 4))
    assert rows["head"] == pytest.approx(2 * 16 * 4) and rows["other"] == pytest.approx(2 * 16 * 2)
    assert rows["total"] == pytest.approx(rows["body"] + rows["head"] + rows["other"])


def test_model_parts_look_through_wrappers():
    inner = nn.Sequential()
    inner.add_module("backbone", nn.Conv2d(3, 4, 1))
    inner.add_module("head", nn.Conv2d(4, 1, 1))
    wrapper = nn.Module()
    wrapper.model = inner
    assert [name for name, _ in model_parts(wrapper)] == ["model.backbone", "model.head"]


def test_size_must_fit_the_divisor():
    model = nn.Conv2d(3, 1, 1)
    model.size_divisor = 32
    with pytest.raises(UserError, match="try 352x1216"):
        info_table(model, (350, 1216))


def test_cli_info_student_table(capsys):
    assert main(["info", "resnet18", "--size", "64x96"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert set(rows) == {"encoder", "head", "total"}
    from distill.models import build_student

    assert float(rows["total"][0]) == pytest.approx(count_parameters(build_student("resnet18")) / 1e6, abs=0.005)
    assert float(rows["total"][1]) == pytest.approx(float(rows["encoder"][1]) + float(rows["head"][1]), abs=0.011)


def test_cli_info_hf_teacher_and_bad_inputs(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    backbone = transformers.Dinov2Config(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )  # fmt: skip
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=8,
    )  # fmt: skip
    transformers.DepthAnythingForDepthEstimation(config).save_pretrained(tmp_path)
    assert main(["info", f"hf:{tmp_path}", "--size", "56x84"]) == 0
    out = capsys.readouterr().out
    assert "model.backbone" in out and "model.head" in out
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert float(total[2]) > 0
    assert main(["info", str(tmp_path / "runs" / "missing.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["info", "resnet81"]) == 2
    assert "resnet18" in capsys.readouterr().err  # close-match suggestion from the student registry


def test_cli_info_checkpoint(tmp_path, capsys):
    from distill.checkpoint import save_checkpoint
    from distill.models import build_student

    student = build_student("resnet18", bins=16, decoder_width=32)
    save_checkpoint(tmp_path / "run" / "best", student, {"step": 1})
    assert main(["info", str(tmp_path / "run"), "--size", "64x96"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total")).split()
    assert float(total[1]) == pytest.approx(count_parameters(student) / 1e6, abs=0.005)
    assert float(total[2]) == pytest.approx(count_flops(student, (64, 96)), abs=0.005)


def test_cli_info_describes_the_head_and_pads_like_export(capsys):
    argv = ["info", "efficientnet_b0", "--size", "176x608", "--decoder-width", "32", "--bins", "64"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "efficientnet_b0 (decoder width 32, 64 bins) at 176x608 (HxW), batch 1"
    assert lines[1].startswith("counted at 192x608: edge-padded to a multiple of 32")
    total = next(line.split() for line in lines if line.startswith("total"))
    assert total[1] == "3.80"  # the README's table: benchmarks/results/latency.json params_m 3.804828
    assert main(["info", "efficientnet_b0", "--size", "64x96"]) == 0
    assert "(decoder width 128, 256 bins)" in capsys.readouterr().out.splitlines()[0]


def test_cli_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "one small function per verb" not in text and "delegating" not in text
    assert "distill VERB --help" in text
