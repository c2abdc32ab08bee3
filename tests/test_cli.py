"""The `lab` command's faces that do not train: presets by name from any folder and from a
built package, --print-config, the config keys in --help, and the shared one-line parser."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, TINY
from lab import presets
from lab.config import Config, config_keys, load_config, to_dict
from lab.errors import ArgumentParser, UserError


def lab_elsewhere(args: list[str], cwd: Path, pythonpath: Path = ROOT,
                  expect: int = 0) -> subprocess.CompletedProcess:
    """`lab ARGS` run from `cwd`, importing the package from `pythonpath` only."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    result = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == expect, result.stderr[-2000:]
    return result


def test_every_config_file_is_a_preset():
    files = sorted(p.relative_to(ROOT / "configs").with_suffix("").as_posix()
                   for p in (ROOT / "configs").rglob("*.yaml"))
    assert presets.names() == files and "tiny" in files and "sweeps/isoflop-tiny" in files
    for name in files:
        assert Path(presets.resolve(name)).read_bytes() == (ROOT / "configs" /
                                                            f"{name}.yaml").read_bytes()
    # As the docs write them, and a sweep by its short name.
    assert Path(presets.resolve("configs/tiny.yaml")).samefile(TINY)
    assert presets.resolve("isoflop-tiny", folder="sweeps").endswith(
        "sweeps/isoflop-tiny.yaml")


def test_a_file_wins_over_a_preset_and_a_bad_name_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("train: {steps: 3}\n")
    assert presets.resolve("tiny") == "tiny"  # the user's file of that name
    with pytest.raises(UserError, match="does not exist and is no preset.*tiny"):
        presets.resolve("tiny-2")
    with pytest.raises(UserError, match="no preset"):
        presets.resolve("../configs/tiny")  # names stay inside the presets folder


def test_print_config_from_another_folder(tmp_path):
    words = ["train.steps=300", "optim.name=muon"]
    out = lab_elsewhere(["train", "tiny", "--print-config", *words], tmp_path).stdout
    assert yaml.safe_load(out) == to_dict(load_config(TINY, words))
    # The docs' spelling works there too, and nothing was trained or written.
    out = lab_elsewhere(["train", "configs/tiny.yaml", "--print-config"], tmp_path).stdout
    assert yaml.safe_load(out) == to_dict(load_config(TINY))
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_config_key_with_type_and_default(tmp_path):
    help_text = lab_elsewhere(["train", "--help"], tmp_path).stdout
    columns = [re.split(r"\s{2,}", line.strip()) for line in help_text.splitlines()]
    lines = {c[0]: c[1:] for c in columns
             if len(c) == 3 and re.fullmatch(r"\w+(\.\w+)+", c[0])}
    defaults = dataclasses.asdict(Config())  # the reference: an instance, not the fields

    def dotted(values: dict, prefix: str) -> dict:  # nested sections: model.moe.experts
        out = {}
        for key, value in values.items():
            out.update(dotted(value, f"{prefix}{key}.") if isinstance(value, dict)
                       else {f"{prefix}{key}": value})
        return out

    expected = dotted(defaults, "")
    assert set(lines) == set(expected) == {k for k, _, _ in config_keys()}
    for key, value in expected.items():
        kind, shown = lines[key]
        # YAML 1.1 reads 1e-06 as a string; the key's type says how to read its default.
        read = float(shown) if kind.split()[0] == "float" else yaml.safe_load(shown)
        assert read == (list(value) if isinstance(value, tuple) else value), key
    # Each key's rule, from its type: choices, a range, a range for each item of a list.
    assert lines["train.steps"][0] == "int in [1, 2**31-1]"
    assert lines["model.attention"][0] == "auto|xla|cudnn|splash|blocked"
    assert lines["optim.b2"][0] == "float in [0, 1)"
    assert lines["mesh.fsdp"] == ["int >= 1 or -1", "-1"]
    assert lines["branch.at_tokens_per_param"][0] == "list[float > 0]"
    assert lines["branch.shape"][0] == '""|linear|cosine|1-sqrt'
    assert "--print-config" in help_text


def test_presets_from_a_built_package(tmp_path):
    """What a wheel holds (setup.py's build step copies configs/ into the package): run from
    another folder against it alone, `lab train tiny` finds its preset inside the package."""
    build = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    packaged = sorted(p.relative_to(build / "lab" / "configs").as_posix()
                      for p in (build / "lab" / "configs").rglob("*.yaml"))
    assert packaged == sorted(p.relative_to(ROOT / "configs").as_posix()
                              for p in (ROOT / "configs").rglob("*.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = lab_elsewhere(["train", "tiny", "--print-config"], elsewhere, pythonpath=build)
    assert yaml.safe_load(where.stdout) == to_dict(load_config(TINY))
    probe = subprocess.run([sys.executable, "-c", "from lab import presets; "
                            "print(presets.resolve('sweeps/lr-tiny'))"], cwd=elsewhere,
                           env=dict(os.environ, PYTHONPATH=str(build)), capture_output=True,
                           text=True, check=True)
    assert Path(probe.stdout.strip()).is_relative_to(build)


def test_sweep_and_demo_take_preset_names(tmp_path):
    out = lab_elsewhere(["sweep", "ladder-tiny", "--dry-run"], tmp_path).stdout
    assert "sweep ladder-tiny (ladder)" in out
    err = lab_elsewhere(["demo", "--study", "no-such-study"], tmp_path, expect=2).stderr
    assert err.count("\n") == 1 and "study file no-such-study does not exist" in err


def test_one_line_usage_errors():
    parser = ArgumentParser(prog="lab thing")
    parser.add_argument("--n", type=int)
    with pytest.raises(UserError, match=r"^lab thing: argument --n: invalid int value: 'x'; "
                                        r"see `lab thing --help`$"):
        parser.parse_args(["--n", "x"])
