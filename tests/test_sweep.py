"""Sweep files: expansion (sizes, budgets, grids, branch plans), the shape rule, the dry run,
and running sweeps end to end through the real `lab` command."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lab.config import ModelConfig, load_config
from lab.errors import UserError
from lab.model.shapes import shape_for_params
from lab.studies.sweep import branch_command, expand_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
BYTE_VOCAB = 320  # lab.model.accounting.padded_vocab(257)


def closed_form_counts(d: int, layers: int, heads: int, seq_len: int, vocab: int = BYTE_VOCAB):
    """Non-embedding N and training FLOPs per token of the default block (multi-head attention,
    SwiGLU of width 3d, untied head), written out by hand: per layer 4d² attention + 9d² MLP +
    2d norm scales; FLOPs 6 per matmul weight plus 6·layers·seq·d for attention."""
    n = layers * (4 * d * d + 9 * d * d + 2 * d) + d + d * vocab
    matmul = layers * 13 * d * d + d * vocab
    return n, 6 * matmul + 6 * layers * seq_len * d


def write_sweep(tmp_path: Path, spec: dict, name: str = "s.yaml") -> Path:
    spec = {"base": str(ROOT / "configs" / "tiny.yaml"), **spec}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def lab(args: list[str], devices: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("target", [1.3e5, 1e6, 3e7, 1e9])
@pytest.mark.parametrize("aspect", [32, 128])
def test_shape_for_params_follows_its_rule(target, aspect):
    shape = shape_for_params(target, aspect_ratio=aspect)
    d, layers, heads = shape["d_model"], shape["n_layers"], shape["n_heads"]
    assert d % 64 == 0 and d // heads == min(64, d // 4)
    n, _ = closed_form_counts(d, layers, heads, seq_len=1)
    assert abs(n / target - 1) <= 0.2
    # Brute force over widths and depths: at each width, the two depths whose N brackets the
    # target; no such shape within 20% of the target has an aspect ratio nearer the requested.
    options = []
    for dd in range(64, 16385, 64):
        ns = [closed_form_counts(dd, ll, dd // min(64, dd // 4), 1)[0] for ll in range(1, 300)]
        below = [ll for ll, nn in enumerate(ns, 1) if nn <= target]
        above = [ll for ll, nn in enumerate(ns, 1) if nn >= target]
        for ll in below[-1:] + above[:1]:
            if abs(ns[ll - 1] / target - 1) <= 0.2:
                options.append(abs(math.log(dd / ll / aspect)))
    best = min(options)
    assert abs(math.log(d / layers / aspect)) == pytest.approx(best)


def test_shape_for_params_respects_tensor_parallelism_and_the_base_model():
    shape = shape_for_params(3e7, tensor=8)
    assert shape["n_heads"] % 8 == 0 and 3 * shape["d_model"] % 8 == 0
    base = load_config(ROOT / "configs" / "tiny.yaml",
                       ["model.n_kv_heads=2", "model.vocab_size=1024"]).model
    gqa = shape_for_params(1e7, base)
    assert gqa["n_heads"] == 2 * gqa["n_kv_heads"]  # the base's group size of 2 is kept
    tiny = shape_for_params(1.3e5)
    assert tiny == {"d_model": 64, "n_layers": 2, "n_heads": 4}  # head size 16 at width 64
    with pytest.raises(UserError, match="closest is d64-l1"):
        shape_for_params(3e4)


# ----------------------------------------------------------------------------- expansion


def test_isoflop_tiny_dry_run_lists_every_run_within_5_percent_of_its_budget():
    result = lab(["sweep", str(SWEEPS / "isoflop-tiny.yaml"), "--dry-run"])
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load((SWEEPS / "isoflop-tiny.yaml").read_text())
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s*\d+\s", line)]
    assert len(rows) == len(spec["budgets"]) * len(spec["sizes"])
    seen_budgets = set()
    for row in rows:
        flops, budget = float(row[4]), float(row[5])
        over = dict(w.split("=", 1) for w in row[9:])  # after the mem/chip column
        n, fpt = closed_form_counts(int(over["model.d_model"]), int(over["model.n_layers"]),
                                    int(over["model.n_heads"]), tiny.train.seq_len)
        tokens = int(over["train.steps"]) * tiny.train.batch_size * tiny.train.seq_len
        assert flops == pytest.approx(fpt * tokens, rel=1e-3)  # the printed FLOPs are right
        assert abs(fpt * tokens / budget - 1) < 0.05, row
        seen_budgets.add(budget)
    assert seen_budgets == {float(b) for b in spec["budgets"]}  # YAML reads 5.0e11 as text


def test_every_shipped_sweep_expands_into_valid_runs():
    moe = "moe" in {f.name for f in dataclasses.fields(ModelConfig)}
    for path in sorted(SWEEPS.glob("*.yaml")):
        if path.stem == "moe-tiny" and not moe:
            continue  # needs model.moe (tests/test_moe_law.py expands it once that merges)
        sweep = expand_sweep(path)
        assert sweep.runs, path
        for run in sweep.runs:
            # The words handed to `lab train` give back the run's own Config, exactly.
            cfg = load_config(sweep.base, list(run.overrides))
            assert cfg == run.config
            assert cfg.run.dir == run.dir and cfg.run.name == run.name
            assert cfg.train.steps == run.steps


def test_grids_are_products_and_fixed_tokens_set_the_steps(tmp_path):
    path = write_sweep(tmp_path, {
        "kind": "grid", "tokens": 1e6,
        "sizes": [{"d_model": 64, "n_layers": 2, "n_heads": 4}, 4.5e5],
        "grid": {"train.batch_size": [8, 32], "optim.lr": [1e-3, 1e-2]},
    })
    sweep = expand_sweep(path, out="out")
    assert len(sweep.runs) == 2 * 2 * 2
    assert sweep.runs[0].name == "d64-l2-bs8-lr0.001"
    for run in sweep.runs:
        cfg = run.config
        assert cfg.train.steps == round(1e6 / (cfg.train.batch_size * cfg.train.seq_len))
        assert run.D == cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
        assert run.dir == f"out/{run.name}"
    lrs = {r.config.optim.lr for r in sweep.runs}
    assert lrs == {1e-3, 1e-2}


def test_ladder_steps_follow_tokens_per_param(tmp_path):
    path = write_sweep(tmp_path, {"kind": "ladder", "tokens_per_param": 20,
                                  "sizes": [1.3e5, {"d_model": 128, "n_layers": 4,
                                                    "n_heads": 4, "name": "mid"}],
                                  "warmup_fraction": 0.1, "decay_fraction": 0.2})
    sweep = expand_sweep(path)
    assert [r.name for r in sweep.runs] == ["d64-l2", "mid"]
    for run in sweep.runs:
        cfg = run.config
        n, _ = closed_form_counts(cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, 1)
        assert run.N == n
        assert run.D == pytest.approx(20 * n, rel=0.01)
        assert cfg.schedule.decay_steps == round(0.2 * cfg.train.steps)


def test_branch_plans_expand_to_stable_runs_and_the_branch_command(tmp_path):
    sweep = expand_sweep(SWEEPS / "branch-tiny.yaml", out="o")
    for run in sweep.runs:
        cfg = run.config
        assert cfg.schedule.decay_steps == 0 and cfg.train.steps == 800
        assert cfg.checkpoint.keep_steps == (200, 400, 800)
        assert branch_command(run) == ["lab", "branch", run.dir, "--at", "200,400,800",
                                       "--decay-steps", "50,100", "--shape", "1-sqrt"]
    path = write_sweep(tmp_path, {"kind": "branch", "branch": {"at": [10], "decay_steps": [5]}})
    with pytest.raises(UserError, match="after the warmup"):
        expand_sweep(path)  # tiny.yaml warms up for 20 steps


def test_hostile_names_stay_labels_and_directories_stay_plain(tmp_path):
    hostile = "a b;rm -rf ~'\""
    path = write_sweep(tmp_path, {"kind": "ladder", "sizes": [
        {"name": hostile, "d_model": 64, "n_layers": 1, "n_heads": 4},
        {"name": "a: b #c", "d_model": 64, "n_layers": 2, "n_heads": 4}]})
    sweep = expand_sweep(path, out=str(tmp_path / "out"))
    for run, name in zip(sweep.runs, [hostile, "a: b #c"], strict=True):
        assert run.name == name
        assert re.fullmatch(r"[A-Za-z0-9._=+-]+", run.slug)
        assert load_config(sweep.base, list(run.overrides)).run.name == name


@pytest.mark.parametrize("spec, message", [
    ({"kind": "isoflop", "sizes": [1e6]}, "needs 'budgets:'"),
    ({"kind": "nope"}, "kind must be one of"),
    ({"kind": "ladder", "sizes": [1e6], "colour": 1}, "unknown key 'colour'"),
    ({"kind": "isoflop", "sizes": [{"d_model": 256, "n_layers": 4, "n_heads": 4}],
      "budgets": [1e11]}, "cannot land within 5%"),
    ({"kind": "ladder", "sizes": [{"d_model": 64, "n_layers": 1, "n_heads": 4}] * 2},
     "would share the directory"),
    ({"kind": "ladder", "sizes": [{"d_model": 63, "n_layers": 1, "n_heads": 4}]},
     "must be divisible by model.n_heads"),
    ({"kind": "ladder", "tokens": 1e6, "tokens_per_param": 20, "sizes": [1e6]}, "keep one"),
])
def test_mistakes_are_user_errors(tmp_path, spec, message):
    with pytest.raises(UserError, match=message):
        expand_sweep(write_sweep(tmp_path, spec))


def test_cli_reports_a_bad_sweep_in_one_line(tmp_path):
    result = lab(["sweep", str(tmp_path / "missing.yaml"), "--dry-run"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: sweep file") and result.stderr.count("\n") == 1
    path = write_sweep(tmp_path, {"kind": "ladder", "sizes": [1.3e5]})
    result = lab(["sweep", str(path), "model.d_model=128", "--dry-run"])
    assert result.returncode == 2 and "sets a key the sweep varies" in result.stderr


# ----------------------------------------------------------------------------- running

TINY_SET = {"train.seq_len": 32, "train.batch_size": 8, "train.eval_every": 0,
            "train.eval_batches": 1, "train.log_every": 2, "schedule.warmup_steps": 1,
            "schedule.decay_steps": 2, "checkpoint.every_steps": 0, "train.steps": 6}


def test_a_two_run_sweep_runs_skips_finished_runs_and_resumes(tmp_path, small_data):
    path = write_sweep(tmp_path, {"kind": "grid", "set": TINY_SET,
                                  "sizes": [{"d_model": 32, "n_layers": 1, "n_heads": 2}],
                                  "grid": {"optim.lr": [1e-3, 1e-2]}})
    out = tmp_path / "out"
    result = lab(["sweep", str(path), f"data.path={small_data}", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    sweep = expand_sweep(path, out=str(out))
    for run in sweep.runs:
        summary = json.loads((Path(run.dir) / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["name"] == run.name
        assert summary["tokens"] == run.D and summary["flops"] == pytest.approx(run.C)
        assert summary["non_embedding_params"] == run.N  # the sweep counted what lab trained
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == ["d32-l1-lr0.001", "d32-l1-lr0.01"]

    (Path(sweep.runs[1].dir) / "summary.json").unlink()  # as if interrupted before it ended
    again = lab(["sweep", str(path), f"data.path={small_data}", "--out", str(out)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[1/2] d32-l1-lr0.001: finished, skipped" in again.stdout
    assert "[2/2] d32-l1-lr0.01: N=" in again.stdout
    assert json.loads((Path(sweep.runs[1].dir) / "summary.json").read_text())["status"] \
        == "finished"


@pytest.mark.slow
def test_a_branch_sweep_trains_the_stable_run_then_its_branches(tmp_path, small_data):
    path = write_sweep(tmp_path, {"kind": "branch", "set": {**TINY_SET, "train.steps": 8},
                                  "sizes": [{"d_model": 32, "n_layers": 1, "n_heads": 2}],
                                  "branch": {"at": [4, 6], "decay_steps": [2], "shape": "linear"}})
    out = tmp_path / "out"
    result = lab(["sweep", str(path), f"data.path={small_data}", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 of 2 branches finished" in result.stdout
    (run,) = expand_sweep(path, out=str(out)).runs
    for name in ("step4-decay2-linear", "step6-decay2-linear"):
        child = json.loads((Path(run.dir) / "branches" / name / "summary.json").read_text())
        assert child["status"] == "finished" and child["parent"] == run.dir
    again = lab(["sweep", str(path), f"data.path={small_data}", "--out", str(out)])
    assert again.returncode == 0 and again.stdout.count("finished already, skipped") == 2


def test_a_configuration_error_stops_the_sweep(tmp_path):
    path = write_sweep(tmp_path, {"kind": "grid", "set": TINY_SET,
                                  "grid": {"optim.lr": [1e-3, 1e-2]}})
    result = lab(["sweep", str(path), f"data.path={tmp_path / 'no-data'}", "--out",
                  str(tmp_path / "out")])
    assert result.returncode == 2
    assert "stopped the sweep on a configuration error" in result.stderr
    assert "[2/2]" not in result.stdout


ISOFLOP_E2E = {
    "kind": "isoflop",
    "budgets": [3.0e10, 1.0e11],
    # Chosen (measured) so each budget's lowest loss is the middle size: the smallest model is
    # too small to use the data, the largest gets too few steps.
    "sizes": [{"d_model": 8, "n_layers": 1, "n_heads": 2},
              {"d_model": 16, "n_layers": 1, "n_heads": 2},
              {"d_model": 64, "n_layers": 2, "n_heads": 4}],
    "warmup_fraction": 0.1,
    "decay_fraction": 0.2,
    "set": {"train.seq_len": 64, "train.batch_size": 8, "train.eval_every": 0,
            "train.eval_batches": 4, "train.log_every": 10, "checkpoint.every_steps": 0,
            "optim.lr": 1.0e-2},
}


@pytest.mark.slow
def test_an_isoflop_sweep_end_to_end_gives_an_isoflop_fit(tmp_path, small_data):
    from analysis import collect_runs, fit_isoflop

    path = write_sweep(tmp_path, ISOFLOP_E2E)
    out = tmp_path / "iso"
    result = lab(["sweep", str(path), f"data.path={small_data}", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = collect_runs(str(out))
    assert len(runs) == 6
    fit = fit_isoflop(runs)
    assert len(fit.budgets) == 2
    for budget, row in zip(ISOFLOP_E2E["budgets"], fit.budgets.itertuples(), strict=True):
        assert row.C == pytest.approx(budget, rel=0.05)
        assert runs["N"].min() < row.N_opt < runs["N"].max()  # an interior optimum
    assert fit.a > 0  # the optimal model grows with compute


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_its_running_training(tmp_path, small_data):
    path = write_sweep(tmp_path, {"kind": "grid", "set": {**TINY_SET, "train.steps": 100000},
                                  "grid": {"optim.lr": [1e-3, 1e-2]}})
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.Popen([sys.executable, "-m", "lab.cli", "sweep", str(path),
                          f"data.path={small_data}", "--out", str(tmp_path / "out")],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    for line in p.stdout:  # wait until the first run trains
        if line.startswith("step "):
            break
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True)
    child = int(children.stdout.split()[0])
    p.send_signal(15)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + 15, rest
    assert "stopped by signal 15" in rest and "[2/2]" not in rest
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the training process is gone too
