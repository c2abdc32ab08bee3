"""`lab data prep|info` and the cached default corpus."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lab.cli.data import main
from lab.data import open_dataset
from lab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Until lab/cli/__init__.py dispatches `lab data`, this is the same contract: UserError -> one
# line, exit 2.
COMMAND = (
    "import sys\n"
    "from lab.cli.data import main\n"
    "from lab.errors import UserError\n"
    "try:\n"
    "    sys.exit(main(sys.argv[1:]))\n"
    "except UserError as e:\n"
    "    print(f'error: {e}', file=sys.stderr)\n"
    "    sys.exit(2)\n"
)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COMMAND, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_prep_then_info(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    for i in range(5):
        (tmp_path / "c" / f"{i}.md").write_text(f"document {i}\n" * 50)
    (tmp_path / "c" / "skip.txt").write_text("not included")
    assert main(["prep", "--source", str(tmp_path / "c"), "--out", str(tmp_path / "out"),
                 "--include", "*.md", "--val-fraction", "0.2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    meta = open_dataset(str(tmp_path / "out")).meta
    total = meta["splits"]["train"]["n_tokens"] + meta["splits"]["val"]["n_tokens"]
    assert total == 5 * (len("document 0\n") * 50 + 1)
    assert f"{total:,} tokens" in line and " s -> " in line
    assert meta["source"]["include"] == ["*.md"] and meta["source"]["n_documents"] == 5

    assert main(["info", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out) == meta


@pytest.mark.parametrize("argv, match", [
    ([], "required"),
    (["prep", "--source", "stdlib"], "--out"),
    (["prep", "--out", "x", "--val-fraction", "lots"], "invalid float"),
    (["frobnicate"], "invalid choice"),
    (["info", "/nonexistent/data"], "no metadata.json"),
])
def test_bad_arguments_are_user_errors(argv, match):
    with pytest.raises(UserError, match=match):
        main(argv)


def test_real_command_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    r = _run("prep", "--source", str(bad), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "bad.jsonl:2: no field 'text'" in r.stderr
    assert not (tmp_path / "out").exists()

    r = _run("info", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no metadata.json" in r.stderr


def test_default_corpus_is_prepared_once_even_when_two_processes_race(tmp_path):
    env = {**os.environ, "LAB_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    code = "from lab.data import default_data_path; print(default_data_path())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    path = Path(paths.pop())
    data_dir = tmp_path / "cache" / "data"
    assert [p.name for p in data_dir.iterdir()] == [path.name]  # no partial directories left
    ds = open_dataset(str(path))
    assert ds.meta["source"]["kind"] == "stdlib" and ds.vocab_size == 257
    assert ds.meta["source"]["path"] == sysconfig.get_paths()["stdlib"]
    mtime = (path / "metadata.json").stat().st_mtime_ns

    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == str(path) and "preparing" not in r.stderr
    assert (path / "metadata.json").stat().st_mtime_ns == mtime
