"""LG-Conv: shapes for every conv flavour, near-identity at init, a live global branch, wrapping rules, ONNX ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from distill.models import build_student
from distill.models.lgconv import LGConv, wrap_lgconv

ONNX_FRIENDLY = {"Conv", "Relu", "ReduceMean", "Expand", "Concat", "Softmax", "MatMul", "Transpose", "Reshape",
                 "Shape", "Slice", "Constant", "Add", "BatchNormalization", "Flatten"}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),  # depthwise
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
        nn.Conv2d(8, 12, 3, stride=(2, 1), padding=1),
    ],
    ids=["dense", "stride2", "depthwise_stride2", "dilated_grouped", "stride_2x1"],
)
def test_output_shape_matches_the_local_conv(conv):
    lg = LGConv(conv, heads=3).eval()
    x = torch.randn(2, conv.in_channels, 13, 19)  # odd sizes: stride-2 grids round up
    with torch.no_grad():
        assert lg(x).shape == conv(x).shape


def test_at_init_the_wrapper_barely_changes_the_conv():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    lg = LGConv(conv).eval()
    x = torch.randn(2, 8, 16, 24)
    with torch.no_grad():
        local, wrapped = conv(x), lg(x)
    assert (wrapped - local).norm() / local.norm() < 1e-2
    assert not torch.equal(wrapped, local)  # the branch is there, just scaled by γ = 0.001


def test_global_branch_carries_information_across_the_whole_image():
    """With γ = 1, a change in one corner of x moves the output in the opposite corner; a 3x3 conv alone cannot."""
    conv = nn.Conv2d(4, 8, 3, padding=1)
    lg = LGConv(conv).eval()
    nn.init.ones_(lg.norm.weight)
    x = torch.randn(1, 4, 16, 16)
    poked = x.clone()
    poked[..., :2, :2] += 5.0
    with torch.no_grad():
        far_lg = (lg(poked) - lg(x))[..., -4:, -4:].abs().max()
        far_conv = (conv(poked) - conv(x))[..., -4:, -4:].abs().max()
    assert far_conv == 0 and far_lg > 1e-3


def test_gradients_reach_the_branch():
    lg = LGConv(nn.Conv2d(4, 8, 3, padding=1)).train()
    lg(torch.randn(2, 4, 8, 8)).square().sum().backward()
    for name in ("reduce", "aggregate", "broadcast", "expand"):
        assert getattr(lg, name).weight.grad.abs().sum() > 0, name


def test_wrap_replaces_only_same_grid_3x3_convs_once():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # wrapped
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU()),  # wrapped (depthwise, nested)
        nn.Conv2d(8, 8, 1),  # 1x1: kept
        nn.Conv2d(8, 8, 5, padding=2),  # 5x5: kept
        nn.Conv2d(8, 8, 3),  # no padding, shrinks the grid: kept
    )
    assert wrap_lgconv(model, heads=2) == 2
    assert isinstance(model[0], LGConv) and isinstance(model[1][0], LGConv)
    assert [type(m) for m in model[2:]] == [nn.Conv2d] * 3
    assert wrap_lgconv(model) == 0  # idempotent: convs inside an LGConv are not wrapped again
    assert isinstance(model[0].local, nn.Conv2d)


def _copy_into_wrapped(plain: nn.Module, wrapped: nn.Module) -> None:
    """Give the wrapped model the plain model's weights (its 3x3 convs live under `.local`)."""
    source = plain.state_dict()
    state = wrapped.state_dict()
    for key in state:
        plain_key = key.replace(".local.", ".")
        if plain_key in source:
            state[key] = source[plain_key]
    wrapped.load_state_dict(state)


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv2_100"])
def test_wrapped_student_equals_the_plain_one_at_init(arch):
    kw = {"bins": 32, "decoder_width": 16}
    plain = build_student(arch, **kw).eval()
    wrapped = build_student(arch, lgconv=True, **kw).eval()
    assert wrapped.lgconv_count > 5 and wrapped.spec["lgconv"] is True
    _copy_into_wrapped(plain, wrapped)
    x = torch.randn(2, 3, 64, 192)
    with torch.no_grad():
        a, b = plain(x), wrapped(x)
    assert ((b.depth - a.depth).abs() / a.depth).max() <= 1e-2
    for fa, fb in zip(a.features, b.features):
        assert (fb - fa).norm() / fa.norm() <= 1e-2
        assert not torch.equal(fa, fb)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy (dynamo=False) exporter is what we ship
def test_lgconv_exports_with_onnx_friendly_ops_only(tmp_path):
    lg = LGConv(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)).eval()
    x = torch.randn(1, 8, 9, 13)
    path = tmp_path / "lg.onnx"
    torch.onnx.export(lg, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops <= ONNX_FRIENDLY, ops - ONNX_FRIENDLY
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = lg(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
