"""Contract tests over every registered student and our teacher kinds, the bins maths, the factory and ONNX export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from distill.errors import UserError
from distill.models import STUDENTS, build_model, build_student, build_teacher
from distill.models.base import DepthModel
from distill.models.bins import bin_centers, expected_depth
from distill.registry import Registry

H, W = 64, 192  # KITTI-like aspect ratio, a multiple of every model's size_divisor (32)
MIN_DEPTH, MAX_DEPTH, BINS = 1e-3, 80.0, 32
SMALL = {"bins": BINS, "min_depth": MIN_DEPTH, "max_depth": MAX_DEPTH, "decoder_width": 16}
HEAVY_STUDENTS = {"resnet50", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5"}
TEACHER_SPECS = (
    "timm:vit_tiny_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
    "hybrid:resnet18+vit_tiny_patch16_224",
    pytest.param("timm:vit_small_patch16_224", marks=pytest.mark.slow),
)
LEGACY_ONNX_EXPORT = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is what we ship


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _student_params():
    return [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY_STUDENTS else a for a in STUDENTS.names()]


def _check_contract(model: DepthModel, size: tuple[int, int] = (H, W), batch: int = 2) -> None:
    """The `DepthModel` contract: shapes, finiteness, depth and bins inside the range, features as declared."""
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, *size))
    assert out.depth.shape == (batch, 1, *size)
    assert torch.isfinite(out.depth).all()
    assert out.depth.min() >= model.min_depth - 1e-4 and out.depth.max() <= model.max_depth + 1e-4
    assert out.centers.shape == (batch, BINS)
    assert (out.centers.diff(dim=1) > 0).all(), "bin centres must increase"
    assert out.centers.min() > model.min_depth and out.centers.max() < model.max_depth
    assert out.probs.shape[:2] == (batch, BINS) and out.probs.shape[-2:] == (size[0] // 4, size[1] // 4)
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones_like(out.probs[:, 0]))
    assert len(out.features) == 4
    for feature, channels, reduction in zip(out.features, model.feature_channels(), model.feature_reductions()):
        assert feature.shape == (batch, channels, size[0] // reduction, size[1] // reduction)
    assert model.output_kind == "metric"
    assert size[0] % model.size_divisor == 0 and model.size_divisor == max(model.feature_reductions())


@pytest.mark.parametrize("arch", _student_params())
def test_student_contract(arch):
    _check_contract(build_student(arch, **SMALL))


@pytest.mark.parametrize("spec", TEACHER_SPECS)
def test_teacher_contract(spec):
    teacher = build_teacher(spec, img_size=(H, W), **SMALL)
    _check_contract(teacher)
    with torch.no_grad():  # the external-teacher signature: frame names are accepted (and unused here)
        out = teacher.eval()(torch.randn(1, 3, H, W), names=["frame_0"])
    assert out.depth.shape == (1, 1, H, W)


@pytest.mark.parametrize("spec", ["timm:vit_tiny_patch16_224", "hybrid:resnet18+vit_tiny_patch16_224"])
def test_teacher_takes_other_input_sizes(spec):
    """Built for 64x192, fed 96x160: position embeddings adapt, features follow the declared strides."""
    _check_contract(build_teacher(spec, img_size=(H, W), **SMALL), size=(96, 160), batch=1)


def test_plain_vit_features_without_reassemble_stay_at_patch_stride():
    teacher = build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), reassemble=False, **SMALL)
    assert teacher.feature_reductions() == [16] * 4 and teacher.feature_channels() == [192] * 4
    assert teacher.indices == [2, 5, 8, 11]  # 4 evenly spaced blocks of 12
    with pytest.raises(ValueError, match="output_stride"):  # the decoder cannot predict finer than its input
        build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), reassemble=False, output_stride=32, **SMALL)


def test_output_stride_two_predicts_at_half_resolution():
    model = build_student("mobilenetv2_100", output_stride=2, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    assert out.probs.shape[-2:] == (H // 2, W // 2) and out.depth.shape[-2:] == (H, W)


def test_models_declare_the_normalisation_their_timm_weights_expect():
    assert build_student("resnet18", **SMALL).mean == (0.485, 0.456, 0.406)
    vit = build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), **SMALL)  # augreg ViTs use 0.5
    assert vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5)


def test_bin_centers_golden():
    centers = bin_centers(torch.tensor([[1.0, 1.0, 2.0]]), 0.0, 4.0)  # edges 0, 1, 2, 4
    torch.testing.assert_close(centers, torch.tensor([[0.5, 1.5, 3.0]]))
    centers = bin_centers(torch.tensor([[2.0, 2.0]]), 1.0, 3.0)  # widths only matter relative to each other
    torch.testing.assert_close(centers, torch.tensor([[1.5, 2.5]]))


def test_expected_depth_is_the_probability_weighted_centre():
    centers = torch.tensor([[1.0, 2.0, 4.0]])
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]).T.reshape(1, 3, 1, 2)
    torch.testing.assert_close(expected_depth(probs, centers), torch.tensor([[[[2.0, 2.5]]]]))


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UserError, match="did you mean 'ghostnet_100'"):
        build_student("ghostnet100")
    with pytest.raises(UserError, match="did you mean 'timm'"):
        build_teacher("tim:vit_tiny_patch16_224", img_size=(H, W))
    with pytest.raises(UserError, match="vit_tiny_patch16_224"):
        build_teacher("timm:vit_tiny_patch16_22", img_size=(H, W))
    with pytest.raises(UserError, match="prefixes: hf, hybrid, onnx, precomputed, timm"):
        build_teacher("vit_tiny_patch16_224", img_size=(H, W))
    with pytest.raises(UserError, match=r"hybrid:<cnn>\+<vit>"):
        build_teacher("hybrid:resnet18", img_size=(H, W))
    with pytest.raises(UserError, match="not a ViT/Swin-style transformer"):
        build_teacher("timm:resnet18", img_size=(H, W))
    with pytest.raises(UserError, match=r"'reasemble'; did you mean 'reassemble'\? \(options: reassemble, encoder_w"):
        build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), reasemble=False)
    with pytest.raises(UserError, match="reassemble must be true or false, got 'maybe'"):
        build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), reassemble="maybe")
    with pytest.raises(UserError, match=r"unknown option 'reassemble' \(options: encoder_weights\)"):
        build_model({"kind": "teacher", "spec": "hybrid:resnet18+vit_tiny_patch16_224", "img_size": [H, W],
                     "reassemble": False})  # fmt: skip


def test_external_prefixes_route_to_external_teachers(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(UserError, match="missing.onnx"):
        build_teacher(f"onnx:{missing}", img_size=(H, W))


def test_registry_rejects_duplicates_and_registers_by_decorator():
    registry: Registry = Registry("thing")

    @registry.register("alpha")
    def alpha():
        return 1

    assert registry.get("alpha") is alpha and "alpha" in registry and registry.names() == ["alpha"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("alpha", alpha)
    with pytest.raises(UserError, match="did you mean 'alpha'.*known: alpha"):
        registry.get("alpah")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "original",
    [
        lambda: build_student("ghostnet_100", lgconv=True, output_stride=2, **SMALL),
        lambda: build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), reassemble=False, **SMALL),
    ],
    ids=["student", "teacher"],
)
def test_spec_round_trip(original):
    model = original()
    spec = json.loads(json.dumps(model.spec))  # what a checkpoint stores
    rebuilt = build_model(spec)
    assert type(rebuilt) is type(model) and rebuilt.spec == model.spec
    assert _shapes(rebuilt) == _shapes(model)
    rebuilt.load_state_dict(model.state_dict())  # so a checkpoint's weights load into the rebuilt model


def test_build_model_rejects_bad_specs():
    with pytest.raises(UserError, match="kind"):
        build_model({"kind": "pupil", "arch": "resnet18"})
    with pytest.raises(UserError, match="'arch'"):
        build_model({"kind": "student"})
    with pytest.raises(UserError, match="decoder_widht"):
        build_model({"kind": "student", "arch": "resnet18", "decoder_widht": 8})


def test_student_loads_imagenet_style_encoder_weights_before_lgconv(tmp_path):
    classifier = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    model = build_student("resnet18", lgconv=True, encoder_weights=path, **SMALL)
    torch.testing.assert_close(model.encoder.layer1[0].conv1.local.weight, classifier.layer1[0].conv1.weight)
    torch.testing.assert_close(model.encoder.conv1.weight, classifier.conv1.weight)
    assert "encoder_weights" not in model.spec


def test_teacher_loads_local_timm_weights_at_another_size(tmp_path):
    """224x224 ViT weights into a 64x192 teacher: timm resizes the position embedding; nothing is downloaded."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    teacher = build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), encoder_weights=str(path), **SMALL)
    torch.testing.assert_close(teacher.backbone.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)
    assert teacher.backbone.pos_embed.shape == (1, 1 + (H // 16) * (W // 16), 192)
    with pytest.raises(UserError, match="does not exist"):
        build_teacher("timm:vit_tiny_patch16_224", img_size=(H, W), encoder_weights=str(tmp_path / "nope.pth"))


class _DepthOnly(nn.Module):
    """ONNX export needs tensors out, not a dataclass."""

    def __init__(self, model: DepthModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out.depth, out.probs, out.centers


@pytest.mark.slow
@LEGACY_ONNX_EXPORT
def test_student_with_lgconv_exports_to_onnx_with_parity(tmp_path):
    model = build_student("ghostnet_100", lgconv=True, **SMALL).eval()
    wrapper = _DepthOnly(model).eval()  # export restores the wrapper's mode recursively: keep it in eval
    image = torch.randn(1, 3, H, W)
    path = tmp_path / "student.onnx"
    torch.onnx.export(
        wrapper,
        (image,),
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["image"],
        output_names=["depth", "probs", "centers"],
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    depth, probs, centers = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        ref = model(image)
    for got, want in ((depth, ref.depth), (probs, ref.probs), (centers, ref.centers)):
        want = want.numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@LEGACY_ONNX_EXPORT
def test_bin_probabilities_export_without_a_softmax_node(tmp_path):
    """ONNX Runtime's Softmax over the channel axis is slow on CPU; the export writes it out, same values."""
    model = build_student("mobilenetv2_100", **SMALL).eval()
    image = torch.randn(1, 3, H, W)
    path = tmp_path / "student.onnx"
    wrapper = _DepthOnly(model).eval()
    torch.onnx.export(wrapper, (image,), str(path), opset_version=17, dynamo=False, input_names=["image"],
                      output_names=["depth", "probs", "centers"])  # fmt: skip
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Softmax" not in ops and {"Exp", "ReduceMax", "ReduceSum"} <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, probs, _ = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        expected = torch.softmax(model.head.bins.logits(model.head.decoder(model.encoder(image))), dim=1)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
