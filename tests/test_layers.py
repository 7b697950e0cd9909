"""The layout is the architecture: distill/'s layers only import downwards, nothing imports in a circle (imports inside
functions included), no source file passes 400 lines, and one `load_model` is the only way models are resolved."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "distill"
# Layers from the bottom up; a module may import its own layer and the ones below. Top-level helper modules are
# layer 0 except the typed config (it types the data section) and the checkpoint storage it validates.
LAYERS = [
    {"errors", "parsing", "registry", "sample_data", "logging_utils", "drawing", "metrics", "flicker", "losses"},
    {"data", "checkpoint_schema", "checkpoint"},
    {"config", "models"},
    {"inference"},
    {"kd"},
    {"completion"},
    {"training"},
    {"verbs"},
    {"cli"},
]
LAYER_OF = {room: index for index, rooms in enumerate(LAYERS) for room in rooms}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The distill modules a file imports, at the top or inside functions (`from a import b` counts a.b if it is a
    module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("distill")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("distill"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return found & known


def room(module: str) -> str:
    """The layer a module belongs to: its first package below distill, or its own name."""
    return module.split(".")[1] if "." in module else module


def graph() -> dict[str, set[str]]:
    sources = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(sources)) - {name} for name, path in sources.items()}


def test_every_module_belongs_to_a_layer():
    unknown = {room(module) for module in graph()} - set(LAYER_OF) - {"distill"}
    assert not unknown, f"modules outside the layer table: {unknown}"


def test_layers_only_import_downwards():
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        if module != "distill"
        for target in targets
        if target != "distill" and LAYER_OF[room(target)] > LAYER_OF[room(module)]
    ]
    assert not upward, f"imports that point up a layer: {upward}"


def test_no_import_circles_counting_imports_inside_functions():
    edges = graph()
    # Importing a package runs its __init__, so an edge to a submodule also reaches the package's own imports.
    for module, targets in edges.items():
        for target in list(targets):
            if "." in target:
                package = target.rsplit(".", 1)[0]
                if package in edges and package != module and not module.startswith(package + "."):
                    targets.add(package)
    state: dict[str, int] = {}

    def visit(node: str, chain: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if target.startswith(node + "."):
                continue  # a package importing its own submodules to register them
            assert state.get(target) != 1, f"import circle: {' -> '.join([*chain, target])}"
            if target not in state:
                visit(target, [*chain, target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_no_source_file_passes_the_line_limit():
    sources = [*PACKAGE.rglob("*.py"), *(REPO / "ros2_ws" / "src" / "depth_node" / "depth_node").glob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_models_are_resolved_in_one_place():
    """Only distill/models builds students and teachers by name; everything else goes through load_model."""
    builder = re.compile(r"\b(build_student|build_teacher|build_completion)\(")
    outside = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               if "models" not in p.relative_to(PACKAGE).parts and builder.search(p.read_text())]  # fmt: skip
    assert not outside, f"model builders called outside distill/models: {outside}"
