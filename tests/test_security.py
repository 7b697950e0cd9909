"""Nothing unsafe is loaded or run: a static scan of every source file, and the loaders refusing hostile files.

The scan resolves import aliases (`from torch import load`, `import subprocess as sp`) and flags: torch.load without
weights_only=True, yaml.load/full_load/unsafe_load, pickle/marshal/dill/joblib/shelve loads, np.load with
allow_pickle, torch.hub, eval/exec, shell=True, os.system/os.popen, and subprocess given a string command.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from test_train import experiment

from distill import checkpoint as ckpt
from distill.cli import main
from distill.config import load_config
from distill.errors import UserError
from distill.models import load_model
from distill.training.run import run_training

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("distill", "ros2_ws/src/depth_node", "benchmarks")
UNSAFE = {
    "runs arbitrary code": "eval exec",
    "runs a shell": "os.system os.popen subprocess.getoutput subprocess.getstatusoutput",
    "unpickles (runs code from the file)": "pickle.load pickle.loads pickle.Unpickler _pickle.load _pickle.loads "
    "dill.load dill.loads joblib.load marshal.load marshal.loads shelve.open pandas.read_pickle",
    "builds Python objects from YAML tags (use yaml.safe_load)": "yaml.load yaml.load_all yaml.full_load "
    "yaml.full_load_all yaml.unsafe_load yaml.unsafe_load_all",
    "downloads and runs hubconf code": "torch.hub.load",
}
FORBIDDEN = {name: why for why, names in UNSAFE.items() for name in names.split()}
TORCH_LOADS = ("torch.load", "torch.serialization.load")
SUBPROCESS = {f"subprocess.{name}" for name in ("run", "call", "check_call", "check_output", "Popen")}


def imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> the module path it stands for (`np` -> numpy, `load` -> torch.load)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load"; None for calls on expressions (`f().x`)."""
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, names)
        return f"{base}.{node.attr}" if base else None
    return None


def is_true(keywords: list[ast.keyword], name: str) -> bool | None:
    """Whether keyword `name` is the constant True; None when absent; True when not a constant (can't prove safe)."""
    for keyword in keywords:
        if keyword.arg == name:
            return not isinstance(keyword.value, ast.Constant) or keyword.value.value is True
    return None


def is_string_command(call: ast.Call) -> bool:
    command = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "args"), None)
    is_str = isinstance(command, ast.Constant) and isinstance(command.value, str)
    return is_str or isinstance(command, ast.JoinedStr | ast.BinOp)


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """'file:line: name: why' for every unsafe call in Python source."""
    tree = ast.parse(source, filename)
    names = imported_names(tree)
    found = []
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        name = dotted(call.func, names) or ""
        why = FORBIDDEN.get(name)
        if name in TORCH_LOADS and not is_true(call.keywords, "weights_only"):
            why = "unpickles unless weights_only=True"
        elif name == "numpy.load" and is_true(call.keywords, "allow_pickle"):
            why = "unpickles with allow_pickle"
        elif name in SUBPROCESS and is_string_command(call):
            why = "a string command goes through a shell or breaks on spaces: pass a list"
        if is_true(call.keywords, "shell"):
            why = "shell=True"
        if why:
            found.append(f"{filename}:{call.lineno}: {name or 'call'}: {why}")
    return found


def source_files() -> list[Path]:
    return sorted(path for root in SCANNED for path in (REPO / root).rglob("*.py") if ".venv" not in path.parts)


def test_sources_never_unpickle_eval_or_shell_out():
    files = source_files()
    assert len(files) > 40 and any(path.name == "node.py" for path in files)  # the scan really covers the tree
    found = [line for path in files for line in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load('w.pt')",
        "import torch\ntorch.load('w.pt', weights_only=False)",
        "from torch import load\nload('w.pt', map_location='cpu')",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "from yaml import full_load\nfull_load(text)",
        "import yaml\nyaml.unsafe_load(text)",
        "import pickle\npickle.loads(data)",
        "from pickle import load as read\nread(file)",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "eval(text)",
        "exec(code)",
        "import os\nos.system('ls')",
        "import subprocess\nsubprocess.run(['ls'], shell=True)",
        "import subprocess as sp\nsp.check_output(f'ls {folder}')",
        "import torch\ntorch.hub.load('repo', 'model')",
    ],
)
def test_the_scan_flags_each_unsafe_call(source):
    assert len(unsafe_calls(source)) == 1


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=True)",
        "import yaml\nyaml.safe_load(text)",
        "model.eval()",
        "import subprocess\nsubprocess.run(['ls', '-l'], check=True, shell=False)",
        "import numpy as np\nnp.load('a.npy')",
        "from safetensors.torch import load_file\nload_file('w.safetensors')",
    ],
)
def test_the_scan_passes_safe_calls(source):
    assert unsafe_calls(source) == []


class Exploit:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("key", ["model.weights", "model.encoder_weights"])
def test_malicious_weights_are_refused_by_distill_train(tmp_path, synth_root, capsys, key):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, evil)
    assert main(["train", str(experiment(tmp_path, synth_root)), f"{key}={evil}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("distill train: error:") and str(evil) in error and "posix.system" in error
    assert len(error.splitlines()) == 1 and not marker.exists()


def plant_pickle(directory: Path, name: str, marker: Path) -> None:
    """Replace a checkpoint file by a pickle that runs code, with a manifest that vouches for it."""
    torch.save({"payload": Exploit(marker)}, directory / name)
    state = json.loads((directory / ckpt.STATE_FILE).read_text())
    data = (directory / name).read_bytes()
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ckpt.write_state(directory, state)  # with the state's own digest recomputed


@pytest.mark.slow
def test_checkpoints_are_never_unpickled_when_evaluated_or_resumed(tmp_path, synth_root):
    marker = tmp_path / "PWNED"
    exp = experiment(tmp_path, synth_root, data={"val_split": None}, train={"steps": 1, "ckpt_every": 1})
    run_dir = run_training(exp)
    plant_pickle(run_dir / "last", ckpt.OPTIMIZER_FILE, marker)
    with pytest.raises(UserError, match=f"{ckpt.OPTIMIZER_FILE}: cannot read the tensors"):
        run_training(exp, ["resume=true", "train.steps=2"])
    plant_pickle(run_dir / "last", ckpt.MODEL_FILE, marker)
    with pytest.raises(UserError, match=f"{ckpt.MODEL_FILE}: cannot load it into the model"):
        load_model(run_dir)
    assert not marker.exists()


def test_yaml_python_tags_are_refused(tmp_path, synth_root, capsys):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run:\n  name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match=f"{config}: not valid YAML: could not determine a constructor"):
        load_config(config)
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"distill train: error: {config}: not valid YAML")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(experiment(tmp_path, synth_root), [f"run.name=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()
