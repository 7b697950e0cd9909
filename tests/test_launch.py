"""launch/kitti.launch.py, tested as far as possible without `launch` (not on PyPI).

The file's imports are checked against the launch / launch_ros API it may use; it is then run with recording
stand-ins for those classes and the REAL ament_index_python over a real `setup.py install_data` prefix, so the
params file it passes is the installed one. The remappings are checked against the topics a real DepthNode creates
and against the topics of the real KITTI bag.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import rclpy
from node_fixtures import KITTI_BAG, PACKAGE, kitti_messages, ramp_model, setup_keyword
from rclpy.parameter import Parameter

from depth_node.node import DepthNode

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "kitti.launch.py"
# The launch / launch_ros names the file may import (all exist in Humble through Kilted).
LAUNCH_API = {
    "launch": {"LaunchDescription"},
    "launch.actions": {"DeclareLaunchArgument"},
    "launch.substitutions": {"LaunchConfiguration"},
    "launch_ros.actions": {"Node"},
    "launch_ros.parameter_descriptions": {"ParameterValue"},
}
# The topic table comes from the package itself (installed beside the launch file by colcon).
OTHER_IMPORTS = {"os": None, "ament_index_python.packages": {"get_package_share_directory"},
                 "depth_node.topics": {"kitti_remappings"}}  # fmt: skip


class Recorded:
    """Stands in for a launch class: keeps its constructor arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_launch_file_imports_only_the_launch_api():
    for node in ast.walk(ast.parse(LAUNCH_FILE.read_text())):
        if isinstance(node, ast.ImportFrom):
            allowed = (LAUNCH_API | OTHER_IMPORTS).get(node.module, set())
            assert {alias.name for alias in node.names} <= allowed, f"from {node.module} import ..."
        elif isinstance(node, ast.Import):
            assert all(alias.name in OTHER_IMPORTS for alias in node.names)


@pytest.fixture(scope="module")
def description(tmp_path_factory, monkeypatch_module):
    """generate_launch_description() with recording launch classes and the package installed into a prefix."""
    prefix = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "setup.py", "-q", "install_data", "--install-dir", str(prefix)], cwd=PACKAGE,
                   check=True, capture_output=True)  # fmt: skip
    monkeypatch_module.setenv("AMENT_PREFIX_PATH", str(prefix))
    for module_name, class_names in LAUNCH_API.items():
        module = types.ModuleType(module_name)
        for name in class_names:
            setattr(module, name, type(name, (Recorded,), {}))
        monkeypatch_module.setitem(sys.modules, module_name, module)
    monkeypatch_module.setitem(sys.modules, "launch_ros", types.ModuleType("launch_ros"))
    spec = importlib.util.spec_from_file_location("kitti_launch", LAUNCH_FILE)
    launch_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_module)
    return launch_module.generate_launch_description(), prefix


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _entities(description, kind: str) -> list[Recorded]:
    return [entity for entity in description.args[0] if type(entity).__name__ == kind]


def test_launch_arguments_are_model_and_use_lidar(description):
    arguments = {a.args[0]: a.kwargs for a in _entities(description[0], "DeclareLaunchArgument")}
    assert set(arguments) == {"model", "use_lidar"}
    assert "default_value" not in arguments["model"] and arguments["use_lidar"]["default_value"] == "false"


def test_node_runs_the_console_script_with_the_installed_params_file(description):
    launch, prefix = description
    (node,) = _entities(launch, "Node")
    assert (node.kwargs["package"], node.kwargs["name"]) == ("depth_node", "depth_node")
    scripts = [line.split("=")[0].strip() for line in setup_keyword("entry_points")["console_scripts"]]
    assert node.kwargs["executable"] in scripts
    params_file, overrides = node.kwargs["parameters"]
    assert Path(params_file) == prefix / "share" / "depth_node" / "config" / "kitti.yaml"
    assert Path(params_file).read_bytes() == (REPO / "config" / "kitti.yaml").read_bytes()
    for name, value_type in (("model", str), ("use_lidar", bool)):
        value = overrides[name]
        assert type(value).__name__ == "ParameterValue" and value.kwargs == {"value_type": value_type}
        assert type(value.args[0]).__name__ == "LaunchConfiguration" and value.args[0].args == (name,)


@pytest.mark.ros
def test_remappings_cover_every_node_topic_and_name_real_kitti2bag_topics(description, tmp_path, shared_data):
    (node,) = _entities(description[0], "Node")
    remappings = dict(node.kwargs["remappings"])
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        values = {"model": str(ramp_model(tmp_path / "m.onnx")), "use_lidar": True}
        names = set()
        for transport in ("raw", "compressed"):
            overrides = [Parameter(k, value=v) for k, v in (values | {"image_transport": transport}).items()]
            depth = DepthNode(context=context, parameter_overrides=overrides)
            names |= {e.topic_name.lstrip("/") for e in [*depth.publishers, *depth.subscriptions]}
            depth.destroy_node()
    finally:
        context.try_shutdown()
    node_topics = names - {"rosout", "parameter_events", "diagnostics"}
    assert set(remappings) == node_topics
    bag_topics = set(kitti_messages(shared_data))
    inputs = {"image", "image/compressed", "camera_info", "lidar"}
    assert {remappings[name] for name in inputs} <= bag_topics, f"not in {KITTI_BAG}"
    assert {name: remappings[name] for name in ("depth", "points", "depth/camera_info")} == {
        "depth": "/depth", "points": "/points", "depth/camera_info": "/depth/camera_info"}  # fmt: skip
