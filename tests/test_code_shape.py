"""The shape a reader can follow (issue 15): no function outside the tests over 80 lines, a
model file of at most 250 lines and a training loop of at most 60. Read with ast, nothing run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lab", "analysis", "launch", "benchmarks")
MAX_FUNCTION = 80
MAX_MODEL_FILE = 250
MAX_LOOP = 60


def functions(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from `def` to the last line) of every function in a file,
    methods and nested functions included."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((name, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), str(path)), "")
    return found


def test_functions_counts_a_method_and_a_nested_function(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("class A:\n    def f(self):\n        def g():\n            return 1\n"
                   "        return g()\n\n\ndef h():\n    pass\n")
    assert functions(src) == [("A.f", 4), ("A.f.g", 2), ("h", 2)]


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(ROOT)}: {name} ({n} lines)"
            for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
            for name, n in functions(path) if n > MAX_FUNCTION]
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_the_model_file_is_at_most_250_lines():
    n = len((ROOT / "lab" / "model" / "transformer.py").read_text().splitlines())
    assert n <= MAX_MODEL_FILE, (f"lab/model/transformer.py has {n} lines; move what is not "
                                 "the model out")


def test_the_training_loop_is_at_most_60_lines():
    sizes = dict(functions(ROOT / "lab" / "train" / "loop.py"))
    assert "Loop.run" in sizes, "the training loop is no longer Loop.run; update this test"
    assert sizes["Loop.run"] <= MAX_LOOP, f"Loop.run has {sizes['Loop.run']} lines"
