"""Typed config: defaults file, experiment merge, key=value overrides, one-line errors naming the key (exit code 2)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.config import (
    DEFAULT_CONFIG,
    Config,
    changed_keys,
    load_config,
    parse_override,
    read_yaml,
    save_config,
    to_dict,
)
from distill.data.registry import DATASETS, DataConfig
from distill.errors import UserError
from distill.kd.registry import resolve_kd

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "config"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | None, overrides: list[str] = (), **kw) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def count_leaves(mapping: dict) -> int:
    return sum(count_leaves(value) if isinstance(value, dict) else 1 for value in mapping.values())


def test_every_default_key_is_commented_with_its_type():
    keys = 0
    for line in DEFAULT_CONFIG.read_text().splitlines():
        match = re.match(r"^\s*(\w+):([^#]*)", line)
        if not match or not match.group(2).strip():
            continue  # comments, blank lines and (sub-)section headers
        keys += 1
        assert re.search(r"# \([^)]+\) \S", line), f"default.yaml key without '# (type) meaning': {line.strip()}"
    assert keys == count_leaves(read_yaml(DEFAULT_CONFIG))


def test_defaults_validate_and_cover_every_field():
    config = load_config(None)
    assert config.train.lr == pytest.approx(4e-5) and config.train.lr_end == pytest.approx(4e-6)
    assert config.train.epochs == 25 and config.train.weight_decay == pytest.approx(1e-2)
    assert config.train.chamfer_weight == pytest.approx(0.1) and config.kd.method == "none"
    assert set(read_yaml(DEFAULT_CONFIG)) == set(Config.model_fields)


def test_experiment_overrides_default_deeply_and_cli_overrides_experiment(tmp_path):
    exp = write(tmp_path, "train: {steps: 100, epochs: null, lr: 1.0e-3}\ndata: {kind: nyu}\n")
    config = load_config(exp, ["train.steps=7", "data.size=[64, 192]", "resume=true", "teacher.spec=null"])
    assert config.train.steps == 7 and config.train.lr == pytest.approx(1e-3)
    assert config.train.lr_end == pytest.approx(4e-6)  # untouched default beside overridden siblings
    assert config.data.size == (64, 192) and config.run.resume is True
    assert config.data.max_depth == 10.0 and config.model.max_depth == 10.0  # null ranges follow the NYU kind


def test_override_values_are_yaml():
    assert parse_override("data.bags=[a.bag, b.bag]", {}) == {"data": {"bags": ["a.bag", "b.bag"]}}
    assert parse_override("teacher.weights=null", {}) == {"teacher": {"weights": None}}
    assert parse_override("seed=3", {"run": {"seed": 0}, "data": {}}) == {"run": {"seed": 3}}
    with pytest.raises(UserError, match="ambiguous.*data.min_depth"):
        parse_override("min_depth=1", {"data": {"min_depth": 0}, "model": {"min_depth": 0}})
    with pytest.raises(UserError, match="key=value"):
        parse_override("train.steps", {})


def test_unknown_key_suggests_the_close_match_with_its_full_key(tmp_path):
    message = error_of(write(tmp_path, "train:\n  stpes: 3\n"))
    assert "train.stpes: unknown key; did you mean 'train.steps'" in message
    assert "did you mean 'train'?" in error_of(None, ["trian.steps=3"])


def test_data_keys_are_those_of_the_chosen_kind():
    assert "data.raw_rot: unknown key; did you mean 'data.raw_root'" in error_of(None, ["data.raw_rot=x"])
    message = error_of(None, ["data.kind=nyu", "data.raw_root=/data/kitti"])
    assert message == "config: data.raw_root: unknown key for data.kind 'nyu' (a key of kitti)"
    assert "data.bags: unknown key for data.kind 'kitti' (a key of bag)" in error_of(None, ["data.bags=[a.bag]"])
    assert "data.gt: unknown key for data.kind 'bag' (a key of kitti)" in error_of(
        None, ["data.kind=bag", "data.gt=velodyne"]
    )
    assert error_of(None, ["data.kind=kiti"]) == (
        "config: data.kind: unknown dataset kind 'kiti'; did you mean 'kitti'? (known: bag, kitti, nyu)"
    )
    assert "data.lidar_extrinsic" in error_of(None, ["data.kind=bag", "data.lidar_extrinsic=3"])
    assert "data.min_depth: 5.0 must be >= 0 and below data.max_depth (1.0)" in error_of(
        None, ["data.min_depth=5", "data.max_depth=1"]
    )


def test_each_kind_takes_its_own_defaults_and_bare_keys():
    kitti = load_config(None, ["kb_crop=true"], check_paths=False).data  # a bare key of the chosen kind
    assert kitti.kb_crop is True and kitti.gt == "annotated" and kitti.lidar_beams is None
    bag = load_config(None, ["data.kind=bag", "data.bags=[a.bag]", "lidar_topic=null"], check_paths=False).data
    assert bag.bags == [Path("a.bag")] and bag.lidar_topic is None
    assert bag.image_topic == "/kitti/camera_color_left/image_raw" and bag.lidar_extrinsic is None
    nyu = load_config(None, ["data.kind=nyu"], check_paths=False)
    assert set(to_dict(nyu)["data"]) == set(read_yaml(DEFAULT_CONFIG)["data"])  # nyu adds no keys


def test_default_yaml_documents_each_kinds_keys_with_their_defaults():
    """The commented `# kind: NAME` blocks of default.yaml list every key of that kind with the class's default."""
    documented: dict[str, dict[str, object]] = {}
    for line in DEFAULT_CONFIG.read_text().splitlines():
        if header := re.match(r"^\s*# kind: (\w+)", line):
            kind = documented.setdefault(header.group(1), {})
        elif entry := re.match(r"^\s*# (\w+): (.*?)\s+# \(", line):
            kind[entry.group(1)] = yaml.safe_load(entry.group(2))
    assert set(documented) == {"kitti", "nyu", "bag"}
    for name, keys in documented.items():
        config = DATASETS.get(name).config
        own = {key: field.default_factory() if field.default_factory else field.default
               for key, field in config.model_fields.items() if key not in DataConfig.model_fields}  # fmt: skip
        assert keys == {key: value if not isinstance(value, Path) else str(value) for key, value in own.items()}


def test_wrong_type_names_key_and_expected_type():
    message = error_of(None, ["train.steps=lots", "train.epochs=null"])
    assert message.startswith("config: train.steps:") and "integer" in message and "'lots'" in message
    assert "train.amp" in error_of(None, ["train.amp=fp32"]) and "'bf16'" in error_of(None, ["train.amp=fp32"])


def test_run_length_set_alone_replaces_the_other(tmp_path):
    config = load_config(None, ["train.steps=5"])
    assert (config.train.steps, config.train.epochs) == (5, None)
    config = load_config(CONFIG_DIR / "student-effb0.yaml", ["train.steps=2"], check_paths=False)
    assert (config.train.steps, config.train.epochs) == (2, None)
    exp = write(tmp_path, "train: {steps: 40}\n")
    assert load_config(exp).train.epochs is None
    assert load_config(exp, ["train.epochs=3"]).train.steps is None
    both = write(tmp_path, "train: {steps: 40, epochs: 2}\n", "both.yaml")
    assert "exactly one of train.steps and train.epochs" in error_of(both)


def test_amp_and_workers_default_to_auto():
    config = load_config(None)
    assert (config.train.amp, config.data.num_workers) == ("auto", "auto")
    assert load_config(None, ["data.num_workers=null"]).data.num_workers is None
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3
    assert "data.num_workers" in error_of(None, ["data.num_workers=-1"])


def test_missing_path_names_key_and_path(tmp_path):
    missing = tmp_path / "no_such_dataset"
    assert error_of(None, [f"data.root={missing}"]) == f"data.root: path does not exist: {missing}"
    assert "data.bags[1]" in error_of(None, ["data.kind=bag", f"data.bags=[{tmp_path}, {missing}]"])
    load_config(None, [f"data.root={missing}"], check_paths=False)


def test_yaml_is_loaded_safely(tmp_path):
    message = error_of(write(tmp_path, "run: !!python/object/apply:os.system ['true']\n"))
    assert "not valid YAML" in message
    assert "expected a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "config file not found" in error_of(tmp_path / "absent.yaml")


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(None, ["train.steps=5", "train.epochs=null", "data.size=[32, 64]"])
    save_config(config, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(config)
    bag = load_config(None, ["data.kind=bag", f"data.bags=[{tmp_path}]", "data.lidar_extrinsic=[[1, 0], [0, 1]]"])
    save_config(bag, tmp_path / "bag.yaml")
    assert to_dict(load_config(tmp_path / "bag.yaml")) == to_dict(bag) and to_dict(bag)["data"]["bags"] == [
        str(tmp_path)
    ]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["size"] == [32, 64]


def test_changed_keys_lists_dotted_differences():
    old = {"train": {"lr": 1.0, "steps": 5}, "run": {"resume": False}}
    new = {"train": {"lr": 2.0, "steps": 5}, "run": {"resume": True}, "kd": {"method": "none"}}
    assert changed_keys(old, new) == ["kd", "run.resume", "train.lr"]


def experiment_files() -> list[str]:
    """Every config/*.yaml made of run-config sections (node parameter files like kitti.yaml are not)."""
    sections = set(Config.model_fields)
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if set(yaml.safe_load(p.read_text()) or {}) <= sections)


@pytest.mark.parametrize("name", experiment_files())
def test_shipped_experiments_validate(name):
    resolve_kd(load_config(CONFIG_DIR / name, check_paths=False))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.stpes=3", "train.stpes: unknown key; did you mean 'train.steps'"),
        ("train.steps=lots", "train.steps: Input should be a valid integer"),
        ("data.root=/no/such/kitti", "data.root: path does not exist: /no/such/kitti"),
        ("data.kind=kiti", "data.kind: unknown dataset kind 'kiti'; did you mean 'kitti'?"),
    ],
)
def test_cli_reports_config_errors_on_one_line_with_exit_code_2(tmp_path, override, expected):
    exp = write(tmp_path, "train: {steps: 3, epochs: null}\n")
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", "train", str(exp), override],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill train: error: ") and expected in lines[0]
