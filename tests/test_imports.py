"""The import graph of lab/, analysis/ and launch/, read with ast (every import statement,
also those inside functions): no cycle, and no import pointing up the layers.

Layers, lowest first; a module may import its own layer and the ones below:
  core      the training core: config, errors, paths, data, model, sharding, optimizers, ...
  train     the train loop and what drives it directly (ahead-of-time compiles, profiling)
  analysis  the fits; from lab it reads run directories only (RUNDIR)
  plan      branching and sweeps, which run the loop (and predict branches with a fitted law)
  apps      the `lab` dispatcher, the demo, `lab fit` and `lab plan`, the launchers
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lab", "analysis", "launch")

TRAIN = {"lab.train", "lab.accel.profiling", "lab.train.aot", "lab.train.lowering"}
PLAN = {"lab.studies.branch", "lab.studies.branch_predict", "lab.studies.sweep"}
APPS = {"lab.cli", "lab.studies.demo", "lab.cli.fit", "lab.studies.plan"}
# What analysis may import from lab: the run directory and its files, the user's errors.
RUNDIR = {"lab", "lab.errors", "lab.paths", "lab.run.metrics", "lab.run.rundir"}
LAYERS = ("core", "train", "analysis", "plan", "apps")

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
    if module in APPS or module.startswith("launch"):
        return "apps"
    if module.startswith("analysis"):
        return "analysis"
    if module in PLAN:
        return "plan"
    if module in TRAIN or module.startswith("lab.train."):
        return "train"
    return "core"


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
    assert "lab.config" in edges["lab.cli"] or "lab.config" in edges["lab.train"]
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
                  and target not in RUNDIR):
                upward.append(f"{name} (analysis) imports {target}, not the run directory")
    assert upward == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert LAYERS.index(layer("lab.studies.demo")) > LAYERS.index(layer("lab.model.transformer"))
    assert layer("analysis.report") == "analysis" and layer("launch.gpu") == "apps"


def test_known_exceptions_still_exist():
    """An exception that is fixed must leave KNOWN, so it cannot come back unnoticed."""
    edges = graph()
    for a, b in KNOWN:
        assert b in edges[a], f"{a} no longer imports {b}: remove it from KNOWN"
