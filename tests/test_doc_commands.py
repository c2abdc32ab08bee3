"""Every `lab ...` command in the code blocks of README.md and docs/*.md (and every whole
`lab train`, `lab sweep` or `lab demo` command quoted in their prose) runs as written, from a
folder outside the checkout (so presets and relative paths are really resolved) and from a
fresh clone with nothing beside it. Each is checked the cheap way: `lab train` with
`--print-config` (and each `key=value` must show in the printed config), `lab sweep` with
`--dry-run`, the other subcommands by parsing their arguments; a `configs/...` path anywhere
in a command must name a file or a preset. A synopsis line (`[--flag ...]`, `INPUT...`) must
name only options the subcommand has, and choices it accepts.

The module is also run inside the clone (`check_docs`), so it imports nothing from tests/.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lab.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
CONFIG_PATH = re.compile(r"^configs/\S+\.ya?ml$")
ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")
INLINE = re.compile(r"`([^`\n]+)`")
PRESET_OPTIONS = ("--study", "--base")  # options that name a config file or preset
# The module holding the parser of each subcommand: lab.cli's table of them.
PARSERS = {name: module for name, (module, _) in SUBCOMMANDS.items()}
# Files a documented command reads that an earlier documented command writes: their commands
# are parsed but not run. Every entry must be used (a stale one fails the test).
NEEDS_EARLIER = {
    "plan1/config.yaml": "written by `lab plan ... --out plan1` on the line above it",
    "plan1/sweep.yaml": "written by `lab plan ... --out plan1` on the line above it",
    "/tmp/plan-demo/sweep.yaml": "written by the transcript's `lab plan --out /tmp/plan-demo`",
    "CHILD/config.yaml": "a branch's config, written by `lab branch` (the prose's placeholder)",
}


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    words: tuple[str, ...]  # after `lab`

    @property
    def synopsis(self) -> bool:
        return any(w.startswith("[") or w.endswith("...") for w in self.words)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: lab {shlex.join(self.words)}"


def _lab_words(line: str) -> list[str] | None:
    """The words after `lab` when the line runs the lab (directly, with environment words in
    front, or after `--` of a launcher), else None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and (ENV_WORD.match(words[0]) or words[0] == "env"):
        words = words[1:]
    if words[:2] == ["python", "-m"] and "--" in words:
        words = words[words.index("--") + 1:]
    if words and words[0] in ("lab", ".venv/bin/lab"):
        return words[1:]
    return None


def commands_in(text: str, doc: str) -> list[DocCommand]:
    """The `lab` commands of a markdown text's code blocks. In a transcript (a block with
    `$ ` lines) only those lines are commands; a line ending in a backslash goes on, and a
    line that starts with `[` continues a synopsis."""
    found: list[DocCommand] = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).splitlines()
        transcript = any(line.startswith("$ ") for line in lines)
        pending, start = "", 0
        for offset, raw in enumerate(lines):
            line = raw.strip()
            if transcript:
                if not line.startswith("$ ") and not pending:
                    continue
                line = line.removeprefix("$ ")
            if line.startswith("[") and found and found[-1].synopsis and not pending:
                found[-1] = DocCommand(doc, found[-1].line,
                                       found[-1].words + tuple(shlex.split(line)))
                continue
            if not pending:
                start = first + offset
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            words = _lab_words(pending + line)
            pending = ""
            if words:
                found.append(DocCommand(doc, start, tuple(words)))
    return found


def inline_commands_in(text: str, doc: str) -> list[DocCommand]:
    """The whole commands quoted in prose: `lab train X ...`, `lab sweep X ...` and
    `lab demo ...` (other spans there are fragments such as `lab fit --method`)."""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found = []
    for span in INLINE.finditer(prose):
        words = _lab_words(span.group(1))
        if words and (words[0] == "demo" or words[0] in ("train", "sweep") and len(words) > 1):
            found.append(DocCommand(doc, prose.count("\n", 0, span.start()) + 1, tuple(words)))
    return found


def documented_commands(root: Path = ROOT) -> list[DocCommand]:
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text, name = doc.read_text(encoding="utf-8"), str(doc.relative_to(root))
        found += commands_in(text, name) + inline_commands_in(text, name)
    return found


def _run_lab(argv: list[str]) -> tuple[int, str, str]:
    """`lab ARGV` in this process: (exit status, stdout, stderr)."""
    from lab.cli import main
    from lab.errors import UserError

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:  # --help
            status = int(e.code or 0)
        except UserError as e:  # raised by a parser outside main's handler
            print(f"error: {e}", file=sys.stderr)
            status = 2
    return status, out.getvalue(), err.getvalue()


def _parse(words: tuple[str, ...]) -> str:
    """A problem with the command's arguments as its subcommand's parser reads them, or ""."""
    from lab.cli import build_parser
    from lab.errors import UserError

    sub = words[0]
    parser = importlib.import_module(PARSERS[sub]).build_parser() if sub in PARSERS else None
    try:
        if parser is None:
            build_parser().parse_args(list(words))
        else:
            parser.parse_args(list(words[1:]))
    except (UserError, SystemExit) as e:
        return f"its arguments do not parse: {e}"
    return ""


def _synopsis_problems(words: tuple[str, ...]) -> list[str]:
    """Options a synopsis names that the subcommand lacks, and choices it refuses."""
    path = [w for w in words[:2] if re.fullmatch(r"[a-z]+", w)][:2 if words[0] == "data" else 1]
    status, usage, err = _run_lab([*path, "--help"])
    if status != 0:
        return [f"`lab {' '.join(path)} --help` failed: {err.strip()}"]
    problems = []
    flat = re.sub(r"\s+", " ", usage)
    for i, word in enumerate(words):
        flag = word.strip("[]")
        if not flag.startswith("--"):
            continue
        if not re.search(rf"(^|[\s\[]){re.escape(flag)}([\s\]=]|$)", flat):
            problems.append(f"`lab {' '.join(path)}` has no option {flag}")
            continue
        choices = re.search(rf"{re.escape(flag)} \{{([^}}]*)\}}", flat)
        given = words[i + 1].strip("[]") if i + 1 < len(words) else ""
        if choices and "|" in given:
            accepted = set(choices.group(1).replace(" ", "").split(","))
            problems += [f"{flag} accepts no {c!r}" for c in given.split("|") if c not in accepted]
    return problems


def _printed_value(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _same(printed, given: str) -> bool:
    wanted = yaml.safe_load(given)
    if isinstance(printed, float) or isinstance(wanted, float):
        try:
            return float(printed) == float(wanted)
        except (TypeError, ValueError):
            return False
    return printed == wanted


def check(cmd: DocCommand) -> tuple[list[str], str]:
    """(problems, why it was not run) for one documented command, run from the working
    directory as it is."""
    from lab import presets
    from lab.errors import UserError

    words, sub = cmd.words, cmd.words[0]
    if cmd.synopsis:
        return _synopsis_problems(words), ""
    if "--help" in words:
        status, _, err = _run_lab(list(words))
        return ([f"exits {status}: {err.strip()}"] if status else []), ""
    problems = []
    for before, word in zip(words, words[1:], strict=False):
        path = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
        if CONFIG_PATH.match(path) or before in PRESET_OPTIONS:
            try:
                presets.resolve(path, folder="sweeps" if sub == "sweep" else "")
            except UserError as e:
                problems.append(str(e))
    if problems:
        return problems, ""
    if sub not in ("train", "sweep"):
        problem = _parse(words)
        return ([problem] if problem else []), ""
    target = words[1] if len(words) > 1 else ""
    if target in NEEDS_EARLIER:
        problem = _parse(words)
        return ([problem] if problem else []), NEEDS_EARLIER[target]
    if sub == "train":
        status, out, err = _run_lab([*words, "--print-config"])
        if status != 0:
            return [f"--print-config exits {status}: {err.strip()}"], ""
        printed = yaml.safe_load(out)
        for word in words[2:]:
            key, _, value = word.partition("=")
            if value and not _same(_printed_value(printed, key), value):
                problems.append(f"{word} is printed as {key}: {_printed_value(printed, key)!r}")
        return problems, ""
    # A dry run with --topology compiles every run for that TPU slice (minutes each; the
    # compiles are tests/test_aot.py's): the option is parsed here, and the sweep expanded
    # without it.
    if (without := _without_option(words, "--topology")) != list(words):
        if problem := _parse(words):
            return [problem], ""
        words = without
    status, out, err = _run_lab([*words, *(() if "--dry-run" in words else ("--dry-run",))])
    if status != 0 or not out.startswith("sweep "):
        return [f"--dry-run exits {status}: {err.strip()}"], ""
    return [], ""


def _without_option(words: tuple[str, ...] | list[str], option: str) -> list[str]:
    """`words` less `option VALUE` and `option=VALUE`."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == option:
            skip = True
        elif not word.startswith(option + "="):
            out.append(word)
    return out


def check_docs(root: Path, only_repository_paths: bool = False) -> dict:
    """Every documented command of `root`'s docs checked from the working directory:
    {"problems": [...], "skipped": {command: reason}}. With only_repository_paths, only the
    commands that name a configs/ path (those written relative to the repository root)."""
    problems, skipped = [], {}
    for cmd in documented_commands(root):
        if only_repository_paths and not any(CONFIG_PATH.match(w.split("=", 1)[-1])
                                             for w in cmd.words):
            continue
        found, reason = check(cmd)
        problems += [f"{cmd}: {p}" for p in found]
        if reason:
            skipped[str(cmd)] = reason
    return {"problems": problems, "skipped": skipped}


COMMANDS = documented_commands()


def test_the_docs_have_commands_of_every_kind():
    kinds = {c.words[0] for c in COMMANDS}
    assert {"train", "sweep", "branch", "fit", "plan", "data", "demo"} <= kinds, kinds
    assert sum(c.synopsis for c in COMMANDS) >= 2


@pytest.mark.parametrize("cmd", COMMANDS, ids=str)
def test_a_documented_command_runs_from_another_folder(cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the checkout under the working directory
    problems, _ = check(cmd)
    assert not problems, "\n".join(problems)


def test_every_command_not_run_names_its_reason():
    needed = {c.words[1] for c in COMMANDS if c.words[0] in ("train", "sweep")
              and len(c.words) > 1 and c.words[1] in NEEDS_EARLIER}
    assert needed == set(NEEDS_EARLIER), "NEEDS_EARLIER lists files no documented command reads"


def _clone(root: Path, dest: Path) -> Path:
    """A `git clone` of the checkout, with the working tree's uncommitted changes on top."""
    subprocess.run(["git", "clone", "-q", "--local", "--no-hardlinks", str(root), str(dest)],
                   check=True, capture_output=True)
    changed = subprocess.run(["git", "ls-files", "-z", "--modified", "--others",
                              "--exclude-standard"], cwd=root, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for name in filter(None, changed):
        source, target = root / name, dest / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        elif target.exists():
            target.unlink()  # deleted in the working tree
    return dest


def test_commands_written_from_the_repository_root_run_in_a_fresh_clone(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = _clone(ROOT, tmp_path / "clone")
    assert not (tmp_path / "shared").exists()
    script = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'tests'); "
              "import lab, test_doc_commands as t; "
              "assert Path(lab.__file__).is_relative_to(Path.cwd()), lab.__file__; "
              "print(json.dumps(t.check_docs(Path.cwd(), only_repository_paths=True)))")
    env = {**os.environ, "PYTHONPATH": str(clone)}
    done = subprocess.run([sys.executable, "-c", script], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["problems"], "\n".join(result["problems"])


BAD_DOCS = {
    "a config that is no file and no preset": "```sh\nlab train configs/nonexistent.yaml\n```",
    "a sweep that is no preset": "```sh\nlab sweep configs/sweeps/nope.yaml --dry-run\n```",
    "an unknown config key": "```sh\nlab train tiny train.stepz=3\n```",
    "an unknown option": "```sh\nlab fit runs/ --methd isoflop\n```",
    "a base that does not exist": "```\nlab plan fit.json --budget 1e14 --out p \\\n"
                                  "    --base configs/nonexistent.yaml\n```",
    "a choice the synopsis invents": "```sh\nlab fit INPUT... [--method approach3|approach4]\n```",
    "a transcript's command": "```\n$ lab branch runs/x --shape cubic\nsome output\n```",
    "a study that is no preset": "Run `lab demo --study demo-huge` for more.",
    "a preset in prose that does not exist": "So `lab train tiny-ish` from any folder.",
}


@pytest.mark.parametrize("text", BAD_DOCS.values(), ids=BAD_DOCS.keys())
def test_a_wrong_doc_command_fails(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = commands_in(text, "fake.md") + inline_commands_in(text, "fake.md")
    assert len(commands) == 1
    problems, _ = check(commands[0])
    assert problems


def test_output_lines_and_prose_are_not_commands():
    text = ("```\n$ lab sweep isoflop-tiny --dry-run\n  then: lab branch runs/a --at 1\n"
            "env X=1 .venv/bin/python -m lab.cli train configs/tiny.yaml\n```\n"
            "`lab fit --method` in prose\n"
            "```sh\nXLA_FLAGS=--x \\\n  .venv/bin/lab train tiny mesh.fsdp=4  # a comment\n"
            "python -m launch.gpu --gpus 0 -- lab train configs/tiny.yaml\n```\n")
    assert inline_commands_in(text, "fake.md") == []
    assert [(c.line, c.words) for c in commands_in(text, "fake.md")] == [
        (2, ("sweep", "isoflop-tiny", "--dry-run")),
        (8, ("train", "tiny", "mesh.fsdp=4")),
        (10, ("train", "configs/tiny.yaml")),
    ]
