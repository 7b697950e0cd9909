"""The ament_python package as colcon would build it (no colcon here): package.xml, setup.py's data files through the
launch/ and config/ links, entry points, declared dependencies against the real imports, and the parameter table.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import tomllib
import yaml
from node_fixtures import PACKAGE, setup_keyword

from depth_node import params, topics

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((PACKAGE / "depth_node").glob("*.py"))
# Imports that are not ROS packages: their rosdep key, or None when they come from pip (setup.py install_requires or,
# for the optional TensorRT backend, the [gpu] notes in README).
NON_ROS = {"numpy": "python3-numpy", "cv2": "python3-opencv", "yaml": "python3-yaml", "tqdm": "python3-tqdm",
           "onnxruntime": None, "rosbags": None, "tensorrt": None, "cuda": None, "depth_node": None}  # fmt: skip


def top_level_imports(path: Path) -> set[str]:
    """Top-level module names a Python file imports (anywhere in it, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_package_xml_is_format_3_ament_python_and_declares_every_ros_import():
    root = ET.parse(PACKAGE / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3" and root.findtext("name") == "depth_node"
    assert root.find("export/build_type").text == "ament_python"
    assert root.findtext("version") == setup_keyword("version")
    depends = {element.text for element in root.findall("exec_depend")}
    imported = set().union(*(top_level_imports(path) for path in [*SOURCES, REPO / "launch" / "kitti.launch.py"]))
    imported -= set(sys.stdlib_module_names)
    for name in sorted(imported):
        key = NON_ROS[name] if name in NON_ROS else name  # anything else imported is a ROS package
        assert key is None or key in depends, f"package.xml lacks <exec_depend>{key}</exec_depend> for `import {name}`"


def test_runtime_code_never_imports_torch_or_distill():
    for path in SOURCES:
        assert not top_level_imports(path) & {"torch", "distill", "torchvision", "timm"}, path.name


def depth_node_imports(path: Path) -> set[str]:
    """depth_node modules a package file imports, at the top or inside functions (relative imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("depth_node")):
            module = (node.module or "").removeprefix("depth_node").lstrip(".")
            names |= {module} if module else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("depth_node.")}
    return names - {""}


def test_package_modules_have_no_import_circle_and_stay_under_400_lines():
    graph = {path.stem: depth_node_imports(path) & {p.stem for p in SOURCES} for path in SOURCES}
    for start in graph:  # depth-first from every module: reaching it again is a circle
        stack, seen = [(start, [start])], set()
        while stack:
            module, chain = stack.pop()
            for imported in graph[module]:
                assert imported != start, f"import circle: {' -> '.join([*chain, imported])}"
                if imported not in seen:
                    seen.add(imported)
                    stack.append((imported, [*chain, imported]))
    assert graph["stream"] >= {"codec", "pipeline"} and "stream" in graph["node"] and "stream" in graph["bag"]
    assert all(len(path.read_text().splitlines()) <= 400 for path in SOURCES)


@pytest.mark.slow
def test_setup_py_installs_the_launch_and_config_files_through_the_links(tmp_path):
    def setup(*command: str) -> None:
        subprocess.run([sys.executable, "setup.py", "-q", *command], cwd=PACKAGE, check=True, capture_output=True)

    assert subprocess.run([sys.executable, "setup.py", "--name"], cwd=PACKAGE, capture_output=True, text=True,
                          check=True).stdout.strip() == "depth_node"  # fmt: skip
    setup("install_data", "--install-dir", str(tmp_path / "install"))
    setup("build_py", "--build-lib", str(tmp_path / "lib"))
    share = tmp_path / "install" / "share"
    assert (share / "ament_index" / "resource_index" / "packages" / "depth_node").is_file()
    for installed, source in [
        (share / "depth_node" / "launch" / "kitti.launch.py", REPO / "launch" / "kitti.launch.py"),
        (share / "depth_node" / "config" / "kitti.yaml", REPO / "config" / "kitti.yaml"),
        (share / "depth_node" / "package.xml", PACKAGE / "package.xml"),
    ]:
        assert installed.read_bytes() == source.read_bytes(), installed
    assert {p.name for p in (tmp_path / "lib" / "depth_node").glob("*.py")} == {p.name for p in SOURCES}
    assert (PACKAGE / "launch").resolve() == REPO / "launch" and (PACKAGE / "config").resolve() == REPO / "config"
    assert not list(PACKAGE.glob("*.egg-info")) and not (PACKAGE / "build").exists()  # nothing left in the source


def test_entry_points_match_pyproject_and_are_callable():
    scripts = dict(line.replace(" ", "").split("=") for line in setup_keyword("entry_points")["console_scripts"])
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: pyproject[name] for name in ("depth_node", "depth_node_bag")}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def _doc_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return {str(params.IDENTITY_4X4): "identity", str(params.OPTICAL_IN_BASE_4X4): "optical"}.get(
            str(value), str(value)
        )
    return '""' if value == "" else str(value)


def test_parameter_table_lists_every_parameter_with_its_default():
    section = (REPO / "README.md").read_text().split("### Parameters")[1].split("\n## ")[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    table = {name.strip(" `"): default.strip(" `") for name, _, default in rows}
    assert list(table) == list(params.PARAMETERS)
    assert table == {name: _doc_default(spec.default) for name, spec in params.PARAMETERS.items()}


def test_readme_topic_tables_list_the_topic_table():
    readme = (REPO / "README.md").read_text()

    def table(heading: str) -> set[str]:
        section = readme.split(heading)[1].split("\n#")[0]
        return {line.split("|")[1].strip(" `") for line in section.splitlines() if line.startswith("| `")}

    assert table("### Subscribed topics") == set(topics.INPUTS)
    assert table("### Published topics") == set(topics.OUTPUTS) | {topics.DIAGNOSTICS}


def test_kitti_yaml_sets_every_parameter_and_resolves():
    values = yaml.safe_load((REPO / "config" / "kitti.yaml").read_text())["/**/depth_node"]["ros__parameters"]
    assert list(values) == list(params.PARAMETERS)
    resolved = params.resolve(values | {"model": "m.onnx"})
    assert resolved["max_depth"] == 80.0 and len(resolved["lidar_to_camera"]) == 16


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_dept": 1.0}, "unknown depth_node parameter 'max_dept' (did you mean 'max_depth'?)"),
        ({"use_lidar": "yes"}, "parameter 'use_lidar' must be true or false, got 'yes'"),
        ({"points_stride": 1.5}, "parameter 'points_stride' must be an integer"),
        ({"min_depth": 5.0, "max_depth": 2.0}, "'min_depth' (5.0) must be < 'max_depth' (2.0)"),
        ({"lidar_to_camera": [1.0] * 12}, "must have 16 values"),
        ({"lidar_to_camera": [1.0] * 16}, "the last row must be 0 0 0 1"),
        ({"lidar_to_camera": [0.0] * 12 + [0.0, 0.0, 0.0, 1.0]}, "must be a rigid transform"),
        ({"lidar_to_camera": [2.0, 0, 0, 0, 0, 2.0, 0, 0, 0, 0, 2.0, 0, 0, 0, 0, 1]}, "determinant 8"),
        ({"diagnostics_period": 1e-6}, "'diagnostics_period' must be in [0.1, 3600.0] s, got 1e-06"),
        ({"max_image_pixels": 0}, "'max_image_pixels' must be >= 1"),
        ({"alignment_momentum": 1.0}, "'alignment_momentum' must be in [0, 1)"),
        ({"sub_reliability": "reliabel"}, "'sub_reliability' must be one of best_effort, reliable"),
    ],
)
def test_bad_parameter_values_are_errors_naming_the_parameter(values, message):
    with pytest.raises(ValueError) as error:
        params.resolve(values)
    assert message in str(error.value)


def test_numbers_are_accepted_in_either_form():
    resolved = params.resolve(
        {"min_depth": 1, "points_stride": 2.0, "lidar_to_camera": [int(v) for v in params.IDENTITY_4X4]}
    )
    assert (resolved["min_depth"], resolved["points_stride"]) == (1.0, 2)
    assert isinstance(resolved["min_depth"], float) and isinstance(resolved["points_stride"], int)
    assert resolved["lidar_to_camera"] == params.IDENTITY_4X4
