"""README.md in step with the code: its shell commands parse with the real CLI, its config keys exist, the JSON
files it cites exist and hold the figures it quotes, and "The toolchain in ten commands" runs (at tiny sizes)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from depth_node.bag import build_parser as bag_parser
from distill.cli import build_parser
from distill.config import DEFAULT_CONFIG, load_config, read_yaml
from distill.data.registry import DATASETS
from distill.kd.registry import METHODS, resolve_kd

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = ("run", "data", "model", "train", "kd", "completion", "teacher", "eval")
# The quick overrides README.md documents below the ten commands: (command prefix, pattern, replacement).
QUICK = [
    ("distill synth", r"--frames \d+", "--frames 12"),
    ("distill synth", r"--size \S+", "--size 64x192"),
    ("distill info", r"--size \S+", "--size 64x192"),
    ("distill export", r"--size \S+", "--size 64x192"),
    ("distill bench", r"--runs \d+", "--runs 3"),
    ("", r"_176x608\.onnx", "_64x192.onnx"),
]
FILE_SUFFIXES = ("json", "csv", "yaml", "md", "py", "onnx")
QUICK_TRAIN = ["train.steps=2", "data.size=[64,192]"]


def section(title: str) -> str:
    """The text of the README section whose heading is `title`, up to the next heading of the same level."""
    level = title.split(" ")[0]
    start = README.index(title + "\n")
    following = re.search(rf"^{level} ", README[start + len(title) :], re.MULTILINE)
    return README[start : start + len(title) + (following.start() if following else len(README))]


def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    return [
        body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL) if lang in languages
    ]


def shell_commands(block: str) -> Iterator[tuple[Path, list[str]]]:
    """(working folder relative to the repository, argv) of each command of a shell block; `cd` moves the folder."""
    cwd = Path(".")
    for line in block.replace("\\\n", " ").splitlines():
        for part in re.split(r"\s&&\s", line):
            argv = shlex.split(part, comments=True)
            if argv and argv[0] == "cd":
                cwd = cwd / argv[1]
            elif argv:
                yield cwd, argv


README_COMMANDS = [command for block in fenced_blocks(README, ("bash", "sh")) for command in shell_commands(block)]


def overrides(argv: list[str]) -> list[str]:
    return [arg for arg in argv[2:] if "=" in arg and not arg.startswith("-")]


def config_keys() -> set[str]:
    """Every dotted config key: config/default.yaml's, each data kind's and each kd method's settings."""

    def walk(mapping: dict, prefix: str) -> Iterator[str]:
        for key, value in mapping.items():
            yield prefix + key
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")

    keys = set(walk(read_yaml(DEFAULT_CONFIG), ""))
    keys |= {f"data.{field}" for name in DATASETS.names() for field in DATASETS.get(name).config.model_fields}
    keys |= {f"kd.{name}.{field}" for name in METHODS.names() for field in METHODS.get(name).settings.model_fields}
    return keys


def test_readme_has_the_ten_commands_and_distill_commands():
    assert len(ten_commands()) == 10
    documented = section("## The toolchain in ten commands").replace("\n", " ")
    for text in [replacement for _, _, replacement in QUICK[:-1]] + QUICK_TRAIN:  # what the slow test runs
        assert f"`{text}" in documented or f" {text}`" in documented, text
    assert sum(argv[0] == "distill" for _, argv in README_COMMANDS) >= 10


@pytest.mark.parametrize("argv", [argv for _, argv in README_COMMANDS if argv[0] == "distill"], ids=" ".join)
def test_distill_commands_parse_with_the_real_cli(argv):
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"README command does not parse: {shlex.join(argv)}")
    if args.verb in ("train", "cache") and (REPO / args.config).is_file():
        resolve_kd(load_config(REPO / args.config, args.overrides, check_paths=False))


def test_depth_node_bag_commands_parse():
    commands = [argv for _, argv in README_COMMANDS if argv[0] == "depth_node_bag"]
    assert commands
    for argv in commands:
        bag_parser().parse_args(argv[1:])


def test_config_files_in_commands_exist_where_the_block_runs():
    checked = 0
    for cwd, argv in README_COMMANDS:
        for arg in argv:
            if arg.endswith(".yaml") and "/" in arg and not arg.startswith("/"):
                assert (REPO / cwd / arg).is_file(), f"{arg} does not exist from {cwd}: {shlex.join(argv)}"
                checked += 1
    assert checked >= 5


def test_every_config_key_the_readme_names_exists():
    known = config_keys()
    pattern = rf"(?<![\w/.])((?:{'|'.join(SECTIONS)})\.[A-Za-z_][\w.]*[A-Za-z_])(?==|`|:)"
    named = {key for key in re.findall(pattern, README) if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES}
    named |= {arg.split("=")[0] for _, argv in README_COMMANDS if argv[0] == "distill" for arg in overrides(argv)}
    assert len(named) > 15
    typos = set(re.findall(r"([\w.]+): unknown key", README))  # the README's example of the error
    assert typos == {"train.stpes"}
    assert sorted(key for key in named - typos if key not in known) == []


def test_the_readme_yaml_experiment_validates(tmp_path):
    (block,) = [body for body in fenced_blocks(README, ("yaml",)) if body.startswith("# my_robot.yaml")]
    path = tmp_path / "my_robot.yaml"
    path.write_text(block)
    config = load_config(path, check_paths=False)
    resolve_kd(config)
    assert config.data.kind == "bag" and config.model.decoder_width == 32


def test_every_results_json_the_readme_names_exists():
    named = set(re.findall(r"benchmarks/results/([\w.-]+\.(?:json|md))", README))
    named |= set(re.findall(r"`([\w-]+\.json)`", section("## Benchmarks")))
    assert {"latency.json", "node_latency.json", "soak.json", "completion.json", "distill_gain.json"} <= named
    assert sorted(name for name in named if not (RESULTS / name).is_file()) == []


def numbers_in(value) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers_in(item)


def quoted_figures(paragraph: str) -> list[str]:
    """Measured figures of a Benchmarks paragraph: decimals in prose and numbers in table cells; ratios (x), shares
    (%), sizes (HxW), targets and settings (integers in prose) are not figures a JSON holds verbatim."""
    text = re.sub(r"targets? [^;)\n]*", "", paragraph)
    text = re.sub(r"\d+x\d+|\S*\d[\d.]*(?:x|\s?%)(?!\w)|`[^`]*`", "", text)
    figures = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            figures += [n for cell in cells if re.match(r"\d", cell) for n in re.findall(r"\d+(?:\.\d+)?", cell)]
        else:
            figures += re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", line)
    return figures


def test_every_benchmark_figure_names_a_json_that_holds_it():
    paragraphs = re.split(r"\n\n+", section("## Benchmarks").split("\n", 1)[1])
    checked, named = 0, []
    for paragraph in paragraphs:
        cited = re.findall(r"([\w-]+\.json)", paragraph)
        named = cited or (named if paragraph.startswith("|") else [])  # a table cites in the paragraph above it
        figures = quoted_figures(paragraph)
        if not figures:
            continue
        assert named, f"figures {figures} quoted without a JSON: {paragraph[:80]!r}"
        values = [v for name in named for v in numbers_in(json.loads((RESULTS / name).read_text()))]
        for figure in figures:
            decimals = len(figure.split(".")[1]) if "." in figure else 0
            held = any(abs(v - float(figure)) <= 0.5 * 10**-decimals + 1e-9 for v in values)  # rounded half up
            assert held, f"{figure} is not in {named}: {paragraph[:80]!r}"
            checked += 1
    assert checked > 60


def ten_commands() -> list[str]:
    block = fenced_blocks(section("## The toolchain in ten commands"), ("bash",))[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith(". ")]


def quick(line: str) -> str:
    """A ten-command line with README.md's documented quick overrides."""
    for prefix, pattern, replacement in QUICK:
        if line.startswith(prefix):
            line = re.sub(pattern, replacement, line)
    if line.startswith("distill train"):
        argv = shlex.split(line, comments=True)
        line = shlex.join([*argv, *QUICK_TRAIN])
    return line


@pytest.mark.slow
def test_the_ten_commands_run_with_the_quick_overrides(tmp_path):
    (tmp_path / "config").symlink_to(REPO / "config")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "ros2_ws/src/depth_node")])}
    scripts = {
        "distill": [sys.executable, "-m", "distill.cli"],
        "depth_node_bag": [sys.executable, "-m", "depth_node.bag"],
    }
    for line in ten_commands():
        argv = shlex.split(quick(line), comments=True)
        result = subprocess.run([*scripts[argv[0]], *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{quick(line)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        if argv[:2] == ["distill", "bench"]:
            assert "metric depth (m)" in result.stdout
    for name in ("teacher-vit", "student-effb0", "disdepth-effb0_from_vit"):
        run = tmp_path / "runs" / name
        assert {"config.yaml", "train.csv", "last"} <= {path.name for path in run.iterdir()}, name
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 2
    assert json.loads((tmp_path / "runs" / "eval.json").read_text())
    assert (tmp_path / "models" / "efficientnet_b0_64x192.onnx").is_file()
    assert (tmp_path / "runs" / "drive_0001_depth").is_dir() and any((tmp_path / "runs" / "viz").iterdir())
