"""The import graph of lab/, analysis/ and launch/, read with ast (every import statement,
also those inside functions): no cycle, and no import pointing up the layers.

The layers are folders (FOLDERS, lowest first; docs/architecture.md shows the same table, and
tests/test_docs.py checks that they agree). A module belongs to the longest folder that holds it
and may import its own layer and the ones below. analysis/ reads from lab only its base and the
run directory (lab/run/), so the fits work on any run directory without the training code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lab", "analysis", "launch")

# folder (a dotted package) -> its layer; LAYERS orders the layers, lowest first.
FOLDERS = {
    "lab": "base",  # lab's top-level modules: config, errors, paths, presets, yaml_file, ...
    "lab.accel": "accel",
    "lab.run": "run",
    "lab.data": "data",
    "lab.model": "model",
    "lab.optim": "optim",
    "lab.train": "train",
    "analysis": "analysis",
    "lab.studies": "studies",
    "lab.cli": "apps",
    "launch": "apps",
}
LAYERS = ("base", "accel", "run", "data", "model", "optim", "train", "analysis", "studies", "apps")
# What analysis may import from lab: its base (errors, paths, config) and the run directory.
ANALYSIS_READS = ("base", "run")

# Known violations, each to be removed by the change that fixes it:
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer(module: str) -> str:
    """The layer of the longest folder in FOLDERS that holds `module`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FOLDERS:
            return FOLDERS[".".join(parts[:n])]
    raise KeyError(f"{module} is in no folder of FOLDERS: add its folder and layer there")


def imports(path: Path, known: set[str], name: str) -> set[str]:
    """The project modules `path` imports (`from pkg import mod` counts as pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a.b.c names the module a.b if c is not one
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods), name) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    edges = graph()
    assert "lab.config" in edges["lab.cli.train"] and "lab.run.rundir" in edges["lab.train.run"]
    assert "analysis.approach3" in edges["analysis.methods"]
    assert "lab.errors" in edges["launch.tpu"]


def test_no_import_cycle():
    edges = graph()
    for a, b in KNOWN:
        edges[a] = edges[a] - {b}
    assert cycles(edges) == []


def test_imports_point_down_the_layers():
    upward = []
    for name, targets in graph().items():
        for target in targets:
            if (name, target) in KNOWN:
                continue
            if LAYERS.index(layer(target)) > LAYERS.index(layer(name)):
                upward.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
            elif (layer(name) == "analysis" and target.startswith("lab")
                  and layer(target) not in ANALYSIS_READS):
                upward.append(f"{name} (analysis) imports {target} ({layer(target)}): from lab "
                              f"it reads only {', '.join(ANALYSIS_READS)}")
    assert upward == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert LAYERS.index(layer("lab.studies.demo")) > LAYERS.index(layer("lab.model.transformer"))
    assert layer("analysis.report") == "analysis" and layer("launch.gpu") == "apps"
    assert layer("lab.config") == "base" and layer("lab.model.kernels.cpu") == "model"


def test_every_module_is_in_a_folder_of_the_table():
    """A new folder must be given its layer; lab/ keeps at most about 10 top-level modules."""
    mods = modules()
    assert {layer(name) for name in mods} == set(LAYERS) == set(FOLDERS.values())
    top = [name for name in mods if name.count(".") == 1 and name.startswith("lab.")
           and (ROOT / "lab" / f"{name.split('.')[1]}.py").exists()]
    assert 5 <= len(top) <= 10, top


def test_known_exceptions_still_exist():
    """An exception that is fixed must leave KNOWN, so it cannot come back unnoticed."""
    edges = graph()
    for a, b in KNOWN:
        assert b in edges[a], f"{a} no longer imports {b}: remove it from KNOWN"


def documented_layers(text: str) -> list[tuple[str, list[str]]]:
    """The rows of docs/architecture.md's layer table: (layer, its folders as dotted packages,
    `lab/*.py` being lab's top level)."""
    rows = re.findall(r"^\| (\w+) \| ((?:`[\w/*.]+`(?:, )?)+) \|", text, re.M)
    return [(name, [re.sub(r"/(\*\.py)?$", "", f).replace("/", ".")
                    for f in re.findall(r"`([\w/*.]+)`", folders)]) for name, folders in rows]


def test_the_documented_layer_table_is_this_one():
    rows = documented_layers((ROOT / "docs" / "architecture.md").read_text())
    assert [name for name, _ in rows] == list(LAYERS)
    assert {folder: name for name, folders in rows for folder in folders} == FOLDERS
