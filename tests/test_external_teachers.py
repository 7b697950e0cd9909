"""Teachers outside our own code: tiny Hugging Face models saved to disk, real ONNX Runtime sessions, cached maps."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depth_node.metadata import ModelMetadata
from distill.cli import main as cli_main
from distill.errors import UserError
from distill.models.teachers import TEACHERS, build_teacher
from distill.models.teachers.precomputed import precomputed_path, write_precomputed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

# The brief pins the TorchScript exporter (dynamo=False), which torch now marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
EXTERNAL_SCHEMES = ("hf", "onnx", "precomputed")


def external(spec: str, **kw):
    """`build_teacher` for teachers that take any input size (their img_size is unused)."""
    return build_teacher(spec, img_size=(28, 42), **kw)


def tiny_dinov2(**kw) -> transformers.Dinov2Config:
    return transformers.Dinov2Config(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False, **kw,
    )  # fmt: skip


def save_depth_anything(folder, estimation_type: str, processor: bool = False):
    config = transformers.DepthAnythingConfig(
        backbone_config=tiny_dinov2(), reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type=estimation_type, max_depth=20,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    if processor:
        transformers.DPTImageProcessor(
            size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
            image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2],
        ).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def da_metric(tmp_path_factory):
    return save_depth_anything(tmp_path_factory.mktemp("da_metric"), "metric")


def test_hf_depth_anything_metric_any_size(da_metric):
    teacher = external(f"hf:{da_metric}", min_depth=0.1, max_depth=80.0)
    assert teacher.output_kind == "metric"
    assert teacher.max_depth == 20.0  # the config's max_depth wins over the caller's default
    assert teacher.mean == IMAGENET_MEAN
    with torch.no_grad():
        out = teacher(torch.randn(2, 3, 30, 44))  # not multiples of 14: runs at 28x42 and resizes back
    assert out.depth.shape == (2, 1, 30, 44)
    assert torch.isfinite(out.depth).all() and (out.depth >= 0).all() and (out.depth <= 20).all()
    assert [tuple(f.shape) for f in out.features] == [(2, 32, 2, 3)] * 4
    assert teacher.feature_channels() == [32] * 4
    assert teacher.feature_reductions() == [14] * 4


def test_hf_features_are_the_backbone_stages_the_neck_reads(da_metric):
    teacher = external(f"hf:{da_metric}")
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        out = teacher(x)
        stages = teacher.model.backbone(x).feature_maps
        direct = teacher.model(pixel_values=x).predicted_depth
    for feature, tokens in zip(out.features, stages):
        expected = tokens[:, 1:].reshape(1, 2, 3, 32).permute(0, 3, 1, 2)  # drop CLS, patch grid 2x3
        torch.testing.assert_close(feature, expected)
    torch.testing.assert_close(out.depth[:, 0], direct)  # at a multiple of 14 nothing is resized


def test_hf_relative_model_reads_processor_and_kind_override(tmp_path):
    folder = save_depth_anything(tmp_path / "da_rel", "relative", processor=True)
    teacher = external(f"hf:{folder}")
    assert teacher.output_kind == "relative_disparity"
    assert teacher.mean == (0.4, 0.4, 0.4) and teacher.std == (0.2, 0.2, 0.2)
    assert teacher.internal_size(352, 1216) == (518, 1792)  # its processor's size: 518 short side, multiples of 14
    assert external(f"hf:{folder}?size=train").internal_size(352, 1216) == (350, 1218)  # nearest multiples of 14
    assert external(f"hf:{folder}?output_kind=relative_depth").output_kind == "relative_depth"
    assert external(f"hf:{folder}?size=56x84").internal_size(352, 1216) == (56, 84)
    from_config = external(f"hf:{folder}", output_kind="metric", size=[42, 70])  # a config's teacher options
    assert from_config.output_kind == "metric" and from_config.internal_size(352, 1216) == (42, 70)


def test_hf_dpt_vit_fixed_size(tmp_path):
    config = transformers.DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
    )  # fmt: skip
    transformers.DPTForDepthEstimation(config).save_pretrained(tmp_path)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    teacher = external(f"hf:{tmp_path}")
    assert teacher.output_kind == "relative_disparity"
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.5, 0.5, 0.5)
    with torch.no_grad():
        out = teacher(torch.randn(1, 3, 24, 40))  # DPT-ViT runs at its square 32x32
    assert out.depth.shape == (1, 1, 24, 40) and torch.isfinite(out.depth).all()
    assert [tuple(f.shape) for f in out.features] == [(1, 32, 4, 4)] * 4


def test_hf_dpt_hybrid_fixed_size_and_conv_stages(tmp_path):
    backbone = transformers.BitConfig(
        global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[32, 64, 128],
        embedding_size=32, num_groups=8, out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True,
    )  # fmt: skip
    config = transformers.DPTConfig(
        is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, 128, 4, 4], hidden_size=32,
        num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[32, 64, 32, 32], fusion_hidden_size=16,
        neck_ignore_stages=[0, 1], readout_type="project",
    )  # fmt: skip
    transformers.DPTForDepthEstimation(config).save_pretrained(tmp_path)
    teacher = external(f"hf:{tmp_path}")
    with torch.no_grad():
        out = teacher(torch.randn(1, 3, 48, 80))  # the hybrid only takes its 64x64 image size
    assert out.depth.shape == (1, 1, 48, 80) and torch.isfinite(out.depth).all()
    assert teacher.feature_channels() == [32, 64, 32, 32] and teacher.feature_reductions() == [4, 8, 16, 16]


def test_bad_specs_are_user_errors(tmp_path, da_metric):
    with pytest.raises(UserError, match="did you mean 'output_kind'"):
        external(f"hf:{da_metric}?output_knid=metric")
    with pytest.raises(UserError, match="output_kind must be one of"):
        external(f"hf:{da_metric}?output_kind=metres")
    with pytest.raises(UserError, match="config.json"):
        external(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match=r"size must be HEIGHTxWIDTH"):
        external(f"hf:{da_metric}?size=big")
    with pytest.raises(UserError, match=r"options must look like \?key=value&key=value"):
        external(f"hf:{da_metric}?size")
    with pytest.raises(UserError, match=r"unknown option 'size' \(options: none\)"):
        external(f"precomputed:{tmp_path}?size=4x4")
    with pytest.raises(UserError, match=r"unknown option 'encoder_weights'.*options: output_kind, size\)"):
        external(f"hf:{da_metric}", encoder_weights=tmp_path / "w.safetensors")  # a config's model.encoder_weights


@pytest.mark.parametrize("prefix", EXTERNAL_SCHEMES)
def test_external_schemes_take_a_path_and_declare_their_options(prefix):
    scheme = TEACHERS.get(prefix)
    assert scheme.path and all(option.meaning for option in scheme.options)
    expected = {"hf": ["output_kind", "size"], "onnx": ["output_kind", "min_depth", "max_depth", "device"]}
    assert [option.name for option in scheme.options] == expected.get(prefix, [])


def save_glpn(folder, depths=(1, 1, 1, 1)):
    """A tiny random-init GLPN (metric, no patch size), saved without preprocessor_config.json."""
    config = transformers.GLPNConfig(
        depths=list(depths), sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1],
        mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=16, max_depth=10,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GLPNForDepthEstimation(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def glpn(tmp_path_factory):
    return save_glpn(tmp_path_factory.mktemp("glpn"))


def test_hf_glpn_without_processor_runs_at_multiples_of_32(glpn, capsys):
    teacher = external(f"hf:{glpn}")
    assert teacher.output_kind == "metric" and teacher.mean == (0.0,) * 3 and teacher.std == (1.0,) * 3
    assert teacher.internal_size(100, 150) == (96, 160)  # GLPNImageProcessor's default size_divisor
    with torch.no_grad():
        out = teacher(torch.rand(1, 3, 100, 150))
    assert out.depth.shape == (1, 1, 100, 150) and torch.isfinite(out.depth).all()
    assert cli_main(["info", f"hf:{glpn}", "--size", "100x150"]) == 0
    assert "total" in capsys.readouterr().out


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _damage_header(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header's opening bytes
    weights.write_bytes(bytes(data))


def _edit_config(**changes):
    def edit(folder):
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _replace_with_bert(folder):
    shutil.rmtree(folder)
    transformers.BertConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(folder)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate, "safetensors weights are truncated or damaged (Error while deserializing header"),
        (_damage_header, "safetensors weights are truncated or damaged (Error while deserializing header"),
        (_edit_config(hidden_sizes=[8, 16, 24, 40]), "do not match config.json: 25 tensors have another shape (e.g."),
        (_edit_config(depths=[1, 1, 1, 2]), "do not match config.json: 18 of the model's tensors are missing (e.g."),
        (_edit_config(model_type="glpnx"), "model_type 'glpnx' is unknown to transformers"),
        (_replace_with_bert, "a 'bert' model is not a depth-estimation model (depth models: "),
        (_edit_config(hidden_sizes="wide"), "invalid config (Validation error for field 'hidden_sizes'"),
    ],
    ids=["truncated", "damaged-header", "shape-mismatch", "missing-tensors", "unknown-type", "not-depth", "bad-field"],
)
def test_broken_hf_folders_are_one_line_errors(glpn, tmp_path, capsys, damage, problem):
    folder = tmp_path / "teacher"
    shutil.copytree(glpn, folder)
    damage(folder)
    assert cli_main(["info", f"hf:{folder}", "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"distill info: error: {folder}") and problem in err


def test_unused_saved_tensors_warn_in_one_line(tmp_path, caplog):
    folder = save_glpn(tmp_path / "deeper", depths=(1, 1, 1, 2))
    _edit_config(depths=[1, 1, 1, 1])(folder)  # the saved fourth stage's second block is left over
    teacher = external(f"hf:{folder}")
    assert teacher.output_kind == "metric"
    unused = "18 saved tensors are not used by config.json's model (e.g. glpn.encoder.block.3.1.attention.output.dense"
    assert [r.getMessage() for r in caplog.records] == [f"{folder}: {unused}.bias)"]


class TinyDepth(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return F.softplus(self.conv(x)) + 0.5


def export_tiny(path, size=(16, 24), dynamic=False, metadata=None):
    model = TinyDepth().eval()
    axes = {"image": {0: "b", 2: "h", 3: "w"}, "depth": {0: "b", 2: "h", 3: "w"}} if dynamic else None
    torch.onnx.export(
        model, torch.zeros(1, 3, *size), path, input_names=["image"], output_names=["depth"],
        dynamic_axes=axes, dynamo=False,
    )  # fmt: skip
    if metadata is not None:
        proto = onnx.load(path)
        onnx.helper.set_model_props(proto, {"depthkd": metadata})
        onnx.save(proto, path)
    return model


def test_onnx_static_without_metadata(tmp_path):
    path = tmp_path / "tiny.onnx"
    model = export_tiny(path)
    teacher = external(f"onnx:{path}", min_depth=0.5, max_depth=50.0)
    assert teacher.output_kind == "metric" and teacher.mean == IMAGENET_MEAN
    assert (teacher.min_depth, teacher.max_depth) == (0.5, 50.0)
    x = torch.randn(3, 3, 32, 48)  # batch 3 through a batch-1 model, twice its size
    out = teacher(x)
    with torch.no_grad():
        small = model(F.interpolate(x, size=(16, 24), mode="bilinear"))
    expected = F.interpolate(small, size=(32, 48), mode="bilinear")
    assert out.depth.shape == (3, 1, 32, 48) and out.features == []
    torch.testing.assert_close(out.depth, expected, atol=1e-5, rtol=1e-5)


def test_onnx_metadata_and_dynamic_size(tmp_path):
    path = tmp_path / "meta.onnx"
    meta = ModelMetadata(
        input_size=None, dynamic=True, size_divisor=4, mean=(0.5,) * 3, std=(0.25,) * 3,
        output_kind="relative_disparity", min_depth=0.01, max_depth=10.0,
    )  # fmt: skip
    model = export_tiny(path, dynamic=True, metadata=meta.to_json())
    teacher = external(f"onnx:{path}")
    assert teacher.mean == (0.5,) * 3 and teacher.std == (0.25,) * 3
    assert teacher.output_kind == "relative_disparity" and teacher.max_depth == 10.0
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).depth, model(x), atol=1e-5, rtol=1e-5)
        odd = torch.randn(1, 3, 21, 29)  # runs at the nearest multiples of the size divisor, 20x28
        expected = F.interpolate(
            model(F.interpolate(odd, size=(20, 28), mode="bilinear")), size=(21, 29), mode="bilinear"
        )
        torch.testing.assert_close(teacher(odd).depth, expected, atol=1e-5, rtol=1e-5)
    overridden = external(f"onnx:{path}?output_kind=metric&max_depth=80", max_depth=50)  # spec wins
    assert overridden.output_kind == "metric" and overridden.max_depth == 80.0


def test_onnx_invalid_metadata(tmp_path):
    path = tmp_path / "bad_meta.onnx"
    export_tiny(path, metadata=json.dumps({"mean": [0.5] * 3}))
    with pytest.raises(UserError, match=r"bad_meta\.onnx.*lacks"):
        external(f"onnx:{path}")


def test_onnx_bad_options(tmp_path):
    path = tmp_path / "tiny.onnx"
    export_tiny(path)
    with pytest.raises(UserError, match="max_depth must be a number, got 'far'"):
        external(f"onnx:{path}?max_depth=far")
    with pytest.raises(UserError, match="device must be cpu or cuda, got 'gpu'"):
        external(f"onnx:{path}", device="gpu")


def test_onnx_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        external(f"onnx:{tmp_path / 'missing.onnx'}")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="broken.onnx"):
        external(f"onnx:{broken}")


def test_precomputed_npy_and_png(tmp_path):
    rng = np.random.default_rng(0)
    metric = rng.uniform(1, 70, size=(2, 12, 20)).astype(np.float32)
    names = ["2011_09_26_drive_0001/0000000005", "2011_09_26_drive_0001/0000000006"]
    write_precomputed(tmp_path / "npy", names, torch.from_numpy(metric)[:, None], "metric", source="tiny")
    write_precomputed(tmp_path / "png", names, metric, "metric", fmt="png")
    assert precomputed_path(tmp_path / "npy", names[0], ".npy").name == "2011_09_26_drive_0001__0000000005.npy"
    x = torch.zeros(2, 3, 12, 20)
    from_npy = external(f"precomputed:{tmp_path / 'npy'}")(x, names).depth
    from_png = external(f"precomputed:{tmp_path / 'png'}")(x, names).depth
    np.testing.assert_array_equal(from_npy[:, 0].numpy(), metric)
    assert np.abs(from_png[:, 0].numpy() - metric).max() <= 0.5 / 256 + 1e-6  # uint16 metres x 256
    resized = external(f"precomputed:{tmp_path / 'npy'}")(torch.zeros(2, 3, 24, 40), names).depth
    assert resized.shape == (2, 1, 24, 40)
    expected = F.interpolate(torch.from_numpy(metric)[:, None], size=(24, 40), mode="bilinear")
    torch.testing.assert_close(resized, expected)


def test_precomputed_reads_kitti_png_with_holes(tmp_path):
    raw = np.zeros((4, 6), np.uint16)
    raw[1, 2] = 256 * 12
    cv2.imwrite(str(tmp_path / "frame.png"), raw)
    (tmp_path / "teacher.json").write_text(json.dumps({"output_kind": "metric", "max_depth": 80}))
    depth = external(f"precomputed:{tmp_path}")(torch.zeros(1, 3, 8, 12), ["frame"]).depth
    assert depth[0, 0, 2, 4] == 12.0 and set(depth.unique().tolist()) == {0.0, 12.0}  # nearest keeps holes


def test_precomputed_errors(tmp_path):
    with pytest.raises(UserError, match="teacher.json"):
        external(f"precomputed:{tmp_path}")
    write_precomputed(tmp_path, ["a"], [np.ones((4, 4))], "relative_depth")
    teacher = external(f"precomputed:{tmp_path}")
    assert teacher.output_kind == "relative_depth"
    with pytest.raises(UserError, match=r"drive__0001\.npy.*write_precomputed"):
        teacher(torch.zeros(1, 3, 4, 4), ["drive/0001"])
    with pytest.raises(UserError, match="another teacher"):
        write_precomputed(tmp_path, ["b"], [np.ones((4, 4))], "metric")
    with pytest.raises(UserError, match="png"):
        write_precomputed(tmp_path / "rel", ["b"], [np.ones((4, 4))], "relative_depth", fmt="png")


def test_routed_through_build_teacher_and_rebuilt_from_spec(da_metric):
    from distill.models import build_model, build_teacher

    teacher = build_teacher(f"hf:{da_metric}", img_size=(28, 42), output_kind="relative_depth")
    assert teacher.output_kind == "relative_depth"
    rebuilt = build_model(teacher.spec)  # what a checkpoint stores
    assert type(rebuilt) is type(teacher) and rebuilt.output_kind == "relative_depth"
    rebuilt.load_state_dict(teacher.state_dict())
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).depth, teacher(x).depth)


def test_hf_teacher_exports_to_onnx_at_a_fixed_size(da_metric, tmp_path):
    """`distill export` traces an hf: teacher (e.g. Depth Anything for benchmarks/latency.py) at a fixed size."""
    from depth_node.engine import open_engine
    from distill.verbs.export import export_onnx

    teacher = external(f"hf:{da_metric}", min_depth=0.1, max_depth=80.0).eval()
    path, metadata = export_onnx(teacher, tmp_path, (28, 42), dynamic=False, opset=17, config={})
    assert metadata.input_size == (28, 42) and metadata.output_kind == "metric"
    image = np.random.default_rng(0).integers(0, 256, (28, 42, 3), dtype=np.uint8)
    depth = open_engine(path, backend="onnxruntime-cpu").infer(image).depth
    assert depth.shape == (28, 42) and np.isfinite(depth).all()
