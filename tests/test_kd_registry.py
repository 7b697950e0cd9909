"""Distillation methods as plugins: the registry types each method's `kd.<name>:` block from the schema its file
declares, refuses unknown names and keys on one line, and builds a method from one registered file."""

from __future__ import annotations

import pytest
import torch

from distill.config import DEFAULT_CONFIG, Section, load_config, read_yaml
from distill.errors import UserError
from distill.kd.disdepth import DisDepthSettings
from distill.kd.method import SupervisedMethod
from distill.kd.registry import (
    METHODS,
    MethodEntry,
    build_method,
    default_settings,
    kd_section,
    method_names,
    resolve_kd,
)
from distill.models import build_student


def resolved(*overrides: str):
    config = load_config(None, list(overrides), check_paths=False)
    resolve_kd(config)
    return config


def error_of(*overrides: str) -> str:
    with pytest.raises(UserError) as info:
        resolved(*overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_every_method_file_registers_itself():
    assert method_names() == ["none", "disdepth", "gtfill", "labelfree", "response", "tiekd"]


def test_default_yaml_documents_each_schemas_defaults():
    documented = read_yaml(DEFAULT_CONFIG)["kd"]
    assert {name: block for name, block in documented.items() if name != "method"} == default_settings()


def test_sections_become_typed_settings():
    config = resolved("kd.method=disdepth", "kd.disdepth.weight=0.2")
    settings = kd_section(config, "disdepth")
    assert isinstance(settings, DisDepthSettings) and settings.weight == pytest.approx(0.2) and settings.fam is True


def test_a_missing_section_takes_the_schema_defaults(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("kd: {method: gtfill}\n")
    config = load_config(experiment, check_paths=False)
    del config.kd.model_extra["gtfill"]  # as if default.yaml had no block for it
    resolve_kd(config)
    assert kd_section(config, "gtfill").ignore_top == 0.0


def test_unknown_names_and_keys_are_one_line_errors_with_close_matches():
    message = error_of("kd.method=disdeph")
    assert "kd.method: unknown method 'disdeph'; did you mean 'disdepth'?" in message and "choices: none" in message
    assert "kd.disdepth.wieght: unknown key; did you mean 'kd.disdepth.weight'" in error_of("kd.disdepth.wieght=1")
    assert "kd.disdeph: unknown key; did you mean 'kd.disdepth'" in error_of("kd.disdeph.weight=1")
    assert "kd.tiekd.sigma" in error_of("kd.tiekd.sigma=-1")
    assert "lam: true needs fam: true" in error_of("kd.disdepth.fam=false")
    assert "kd.tiekd: section missing (null)" in error_of("kd.method=tiekd", "kd.tiekd=null")


def test_missing_paths_of_the_chosen_method_are_refused(tmp_path):
    missing = tmp_path / "phi.safetensors"
    message = error_of("kd.method=labelfree", f"kd.labelfree.pointnet_weights={missing}")
    assert message == f"kd.labelfree.pointnet_weights: path does not exist: {missing}"


class ProbeSettings(Section):
    scale: float = 2.0


class ProbeMethod(SupervisedMethod):
    """Supervised loss times `scale`: enough to see the registry build it with its settings and no teacher."""

    def __init__(self, student, config, settings: ProbeSettings) -> None:
        train = config.train
        super().__init__(student, train.silog_alpha, train.silog_lambda, train.chamfer_weight)
        self.scale = settings.scale


def test_a_new_method_is_one_registration(monkeypatch):
    entry = MethodEntry(ProbeSettings, lambda student, teacher, config, s: ProbeMethod(student, config, s), False)
    monkeypatch.setitem(METHODS._items, "probe", entry)
    config = resolved("kd.method=probe", "kd.probe.scale=3.5")
    method = build_method(config, build_student("resnet18", bins=4, decoder_width=8), torch.device("cpu"))
    assert isinstance(method, ProbeMethod) and method.scale == pytest.approx(3.5)
    assert "kd.probe.scal: unknown key; did you mean 'kd.probe.scale'" in error_of("kd.method=probe", "kd.probe.scal=1")
