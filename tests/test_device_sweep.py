"""The device sweep (benchmarks/device_sweep.py) rehearsed on the CPU with --smoke: its plan, a
variant's figures and row, the time limit that kills a variant while the rows already written
stay, the variants tried together, the table and its verdict; end to end in the slow selection.
It measures nothing here: the figures that count come from one H100 or H200."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import device_sweep
from benchmarks.device_sweep import ACCUM_TOKENS, Variant, combined, plan, read_rows, table

ROOT = Path(__file__).resolve().parents[1]


def _overrides(variant: Variant) -> dict[str, str]:
    return dict(o.split("=", 1) for o in variant.overrides)


def test_the_baseline_is_the_preset_and_the_device_checks_model():
    """configs/gpu/1b.yaml is the ~1B step the device check measured (d2048, 16 layers, seq
    2048, batch 8, bf16, cuDNN attention, chunked loss, remat=dots) until the sweep replaces it."""
    cfg = device_sweep.load([], smoke=False)
    m, t = cfg.model, cfg.train
    assert (m.d_model, m.n_layers, m.n_heads, m.vocab_size) == (2048, 16, 16, 32768)
    assert (t.seq_len, t.batch_size, t.grad_accum) == (2048, 8, 1)
    assert (m.compute_dtype, m.activation_dtype, m.attention, m.loss_chunk, m.remat) == (
        "bfloat16", "bfloat16", "cudnn", 1024, "dots")


def test_the_plan_changes_one_thing_at_a_time():
    variants = plan(smoke=False)
    names = [v.name for v in variants]
    assert names[0] == "baseline" and not variants[0].overrides
    assert len(set(names)) == len(names)
    assert {"remat-none", "batch-x2", "loss-chunk-x4", "xla-flags"} <= set(names)
    assert any(n.startswith("backward-") for n in names)
    assert _overrides(variants[names.index("batch-x2")]) == {"train.batch_size": "16"}
    assert _overrides(variants[names.index("loss-chunk-x4")]) == {"model.loss_chunk": "4096"}
    assert variants[names.index("xla-flags")].xla_flags
    step = [v for v in variants if v.group == "step"]
    assert all(len(v.overrides) <= 1 for v in step)
    # Muon against AdamW at the same accumulation, at least 0.5M tokens per optimizer step.
    optimizer = [v for v in variants if v.group == "optimizer"]
    assert [v.name.split("-accum")[0] for v in optimizer] == ["adamw", "muon-bf16", "muon-f32"]
    for v in optimizer:
        o = _overrides(v)
        assert int(o["train.batch_size"]) * 2048 >= ACCUM_TOKENS
        assert int(o["train.batch_size"]) == 8 * int(o["train.grad_accum"]) == 8 * 32


def test_a_variant_measures_and_writes_its_row(tmp_path):
    """In this process (8 CPU devices): the row's figures follow from its step times; a variant
    that fails writes a row saying so, after the first, which stays."""
    from lab.model.accounting import flops_per_token

    assert device_sweep.run_child(tmp_path, "accum", ["train.batch_size=16",
                                                      "train.grad_accum=2"], 2, smoke=True) == 0
    assert device_sweep.run_child(tmp_path, "broken", ["model.n_heads=3"], 2, smoke=True) == 1
    ok, broken = read_rows(tmp_path)
    assert ok["status"] == "ok" and ok["steps"] == 2 and ok["tokens_per_step"] == 16 * 64
    assert ok["best_s"] <= ok["step_s"] and ok["tokens_per_s"] == pytest.approx(
        16 * 64 / ok["step_s"])
    fpt = flops_per_token(device_sweep.load([], smoke=True).model, 64)
    assert ok["mfu"] == pytest.approx(fpt * 16 * 64 / ok["step_s"] / 989e12)
    assert 0.01 < ok["peak_gb"] < 100 and ok["peak_of"] == "host RSS"
    assert broken["status"].startswith("failed: model.d_model (64) must be divisible")


def test_a_variant_past_its_limit_is_killed_and_the_rows_before_stay(tmp_path):
    finished = {"variant": "baseline", "overrides": [], "status": "ok", "step_s": 0.5,
                "best_s": 0.4, "tokens_per_step": 512, "tokens_per_s": 1024.0, "mfu": 0.3,
                "peak_gb": 1.0}
    device_sweep.append_row(tmp_path, finished)
    rows = device_sweep.sweep(tmp_path, smoke=True, budget_s=600, only=["loss-chunk-x4"],
                              limits={"loss-chunk-x4": 0.5})
    assert [r["status"] for r in rows] == ["timed out after 0.5 s"]
    assert read_rows(tmp_path) == [finished, rows[0]]
    skipped = device_sweep.run_variant(Variant("x", ("model.no_such_key=1",)), tmp_path, True, 9)
    assert skipped["status"].startswith("skipped: unknown config key 'model.no_such_key'")
    shown = table(read_rows(tmp_path))
    assert "timed out" in shown and "fastest: baseline" in shown


def _row(name, tokens_per_s, overrides=(), **extra):
    return {"variant": name, "overrides": list(overrides), "status": "ok",
            "tokens_per_s": tokens_per_s, "step_s": 1 / tokens_per_s, "best_s": 1 / tokens_per_s,
            "tokens_per_step": 1, "mfu": tokens_per_s / 1000, "peak_gb": 1.0, **extra}


def test_the_variants_that_help_are_tried_together_and_the_fastest_is_named():
    variants = [Variant("baseline"), Variant("remat-none", ("model.remat=none",)),
                Variant("remat-auto", ("model.remat=auto",)),
                Variant("batch-x2", ("train.batch_size=16",)), Variant("xla-flags", xla_flags=True),
                Variant("loss-chunk-x4", ("model.loss_chunk=4096",))]
    rows = [_row("baseline", 100), _row("remat-none", 120, ["model.remat=none"]),
            _row("remat-auto", 130, ["model.remat=auto"]),
            _row("batch-x2", 110, ["train.batch_size=16"]), _row("xla-flags", 100.5),
            {"variant": "loss-chunk-x4", "overrides": [], "status": "failed: out of memory"}]
    together = combined(variants, rows)
    # remat none and auto set one key: the faster wins; 0.5% is not a gain.
    assert together.overrides == ("model.remat=auto", "train.batch_size=16")
    assert not together.xla_flags and together.note == "remat-auto+remat-none+batch-x2"
    assert combined(variants, rows[:2]) is None  # one helped: nothing to combine
    rows.append(_row("combined", 150, together.overrides, lab_xla_flags=True))
    rows += [_row("adamw-accum32", 10, ["train.grad_accum=32"]),
             _row("muon-bf16-accum32", 10 / 1.05, ["train.grad_accum=32"]),
             _row("muon-f32-accum32", 10 / 1.5, ["train.grad_accum=32"])]
    shown = table(rows).splitlines()
    assert "fastest: combined, 150 tokens/s, MFU 15.0%" in shown
    assert ("configs/gpu/1b.yaml becomes it with: model.remat=auto train.batch_size=16 and run "
            "it through python -m launch.gpu (its XLA flags)") in shown
    assert any(s.startswith("muon-bf16-accum32 / adamw-accum32: 1.050x") and "met" in s
               for s in shown)
    assert any(s.startswith("muon-f32-accum32 / adamw-accum32: 1.500x") and "missed" in s
               for s in shown)
    assert "failed: out of memory" in shown[6] and "1.300" in shown[3]  # x baseline


@pytest.mark.slow
def test_the_smoke_sweep_runs_end_to_end(tmp_path):
    """Every variant of the plan in its own process, a row each, then the table."""
    result = subprocess.run([sys.executable, "benchmarks/device_check.py", "sweep",
                             str(tmp_path), "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path)
    names = {v.name for v in plan(smoke=True)}
    assert names <= {r["variant"] for r in rows}
    for r in rows:
        # a key another branch adds (model.backward_dtype, remat=auto) may be missing
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
    assert "fastest: " in result.stdout and "muon-bf16-accum2 / adamw-accum2" in result.stdout
    again = subprocess.run([sys.executable, "benchmarks/device_check.py", "table",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert all(f"\n{name} " in again.stdout for name in names) and "fastest: " in again.stdout
