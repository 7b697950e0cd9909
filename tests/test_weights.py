"""Weights files users bring: safetensors and torch checkpoints round trip; pickled code is never run."""

from __future__ import annotations

import argparse
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from distill.errors import UserError
from distill.models.weights import load_timm_encoder_weights, load_weights


def tiny_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()


def make_pair() -> tuple[nn.Module, nn.Module]:
    source, target = tiny_net(0), tiny_net(1)
    x = torch.randn(1, 3, 6, 6)
    source(x), target(x)  # materialise the lazy layer
    source[1].running_mean.fill_(0.3)
    return source, target


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)


def test_safetensors_round_trip(tmp_path):
    source, target = make_pair()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    report = load_weights(target, tmp_path / "w.safetensors")
    assert len(report.loaded) == len(source.state_dict()) and not report.missing and not report.unexpected
    assert_same(source, target)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_ddp", "timm_train"])
def test_torch_checkpoint_round_trip_unwraps_containers(tmp_path, wrap):
    source, target = make_pair()
    state = source.state_dict()
    checkpoint = {
        "plain": state,
        "state_dict": {"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}},
        "model_ddp": {"model": {f"module.{k}": v for k, v in state.items()}},
        "timm_train": {"state_dict": state, "args": argparse.Namespace(lr=0.1, model="tiny")},  # timm's train.py
    }[wrap]
    torch.save(checkpoint, tmp_path / "w.pth")
    load_weights(target, tmp_path / "w.pth")
    assert_same(source, target)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused to unpickle"):
        load_weights(tiny_net(0), tmp_path / "evil.pth")
    assert not marker.exists()


def test_shape_mismatch_names_the_key(tmp_path):
    _, target = make_pair()
    state = dict(target.state_dict())
    state["0.weight"] = torch.zeros(5, 3, 3, 3)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match=r"'0\.weight'.*\(5, 3, 3, 3\).*\(4, 3, 3, 3\)"):
        load_weights(target, tmp_path / "w.safetensors")


def test_missing_and_unexpected_keys(tmp_path):
    source, target = make_pair()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("3.")}
    state["head.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "w.safetensors")
    before = target[3].weight.clone()
    with pytest.raises(UserError, match=r"2 missing from the file: 3\.bias, 3\.weight; 1 not in the model: head"):
        load_weights(target, tmp_path / "w.safetensors")
    torch.testing.assert_close(target[0].weight, tiny_net(1)[0].weight)  # strict failure loads nothing
    report = load_weights(target, tmp_path / "w.safetensors", strict=False)
    assert report.missing == ["3.bias", "3.weight"] and report.unexpected == ["head.weight"]
    torch.testing.assert_close(target[0].weight, source[0].weight)
    torch.testing.assert_close(target[3].weight, before)


def test_prefix_map(tmp_path):
    source, target = make_pair()
    save_file({f"backbone.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    load_weights(target, tmp_path / "w.safetensors", prefix_map={"backbone.": ""})
    assert_same(source, target)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights(tiny_net(0), tmp_path / "nope.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="junk.safetensors"):
        load_weights(tiny_net(0), tmp_path / "junk.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(UserError, match="junk.pth"):
        load_weights(tiny_net(0), tmp_path / "junk.pth")


def test_timm_classifier_weights_into_features_only_encoder(tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("mobilenetv2_050", pretrained=False)
    save_file(classifier.state_dict(), tmp_path / "imagenet.safetensors")
    encoder = timm.create_model("mobilenetv2_050", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    report = load_timm_encoder_weights(encoder, tmp_path / "imagenet.safetensors")
    assert "classifier.weight" in report.unexpected and not report.missing
    own = classifier.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, own[key])
    other = timm.create_model("resnet10t", pretrained=False, features_only=True)
    with pytest.raises(UserError, match="imagenet.safetensors"):  # another architecture
        load_timm_encoder_weights(other, tmp_path / "imagenet.safetensors")


def test_timm_classifier_file_given_as_model_weights_points_to_encoder_weights(tmp_path):
    from distill.models import load_model

    classifier = timm.create_model("resnet18", pretrained=False)
    save_file(classifier.state_dict(), tmp_path / "imagenet.safetensors")
    with pytest.raises(UserError) as info:
        load_model("resnet18", weights=tmp_path / "imagenet.safetensors", decoder_width=16, bins=16)
    assert "model.encoder_weights" in str(info.value) and "\n" not in str(info.value)
    loaded = load_model("resnet18", encoder_weights=tmp_path / "imagenet.safetensors", decoder_width=16, bins=16).model
    first = next(k for k in classifier.state_dict() if k.endswith("weight"))
    assert torch.equal(loaded.encoder.state_dict()[first], classifier.state_dict()[first])
