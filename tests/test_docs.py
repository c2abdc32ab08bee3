"""The docs stand on the repository alone: no file points outside it (to the developers' design
notes or the folder beside the checkout), and every benchmark record a doc cites exists."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Spelled in two pieces so that this file does not match itself.
OUTSIDE = ("DESIGN" + ".md", "../" + "shared")
SKIP_DIRS = {".git", ".venv", ".cache", ".ci", "__pycache__", ".pytest_cache", ".ruff_cache",
             "runs", "build", "dist"}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A record is cited by its path under benchmarks/results/, or by its bare file name in backticks
# (run-directory files such as `summary.json` have no hyphen in their names; records do).
RECORD = re.compile(r"benchmarks/results/([\w.-]+\.\w+)|`([\w.]*-[\w.-]*\.(?:txt|json|csv|png))`")


def repository_files() -> list[Path]:
    """The files a clone has (tracked, or new and not ignored); a walk where git is absent."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                                 "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in listed.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    return [ROOT / n for n in names
            if not SKIP_DIRS.intersection(Path(n).parts[:-1]) and (ROOT / n).is_file()]


def test_no_file_points_outside_the_repository():
    files = repository_files()
    assert ROOT / "README.md" in files and Path(__file__) in files
    offenders = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary: images, checkpoints
        for word in OUTSIDE:
            for number, line in enumerate(text.splitlines(), 1):
                if word in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {word}")
    assert not offenders, "write the fact down in the repository instead:\n" + "\n".join(offenders)


def cited_records(text: str) -> set[str]:
    return {path or name for path, name in RECORD.findall(text)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_benchmark_records_exist(doc):
    results = ROOT / "benchmarks" / "results"
    cited = cited_records(doc.read_text(encoding="utf-8"))
    missing = sorted(name for name in cited if not (results / name).is_file())
    assert not missing, f"{doc.name} cites records absent from benchmarks/results: {missing}"


def test_the_record_pattern_finds_citations():
    text = ("(`benchmarks/results/vm-20261123-223326.json`, `vm-20261124-002637.json`; "
            "raw numbers in `mup-raw.json`), output in\n`benchmarks/results/demo-full-20261129.txt`"
            " and `against-502e82b-bfloat16.txt`; the run writes `summary.json` and `fit.json`")
    assert cited_records(text) == {"vm-20261123-223326.json", "vm-20261124-002637.json",
                                   "mup-raw.json", "demo-full-20261129.txt",
                                   "against-502e82b-bfloat16.txt"}
