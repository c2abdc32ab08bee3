"""The lab on one NVIDIA H100/H200: the device sweep of the ~1B train step, and two checks
(device_check.sh runs them, each under `timeout`, and prints the table):

    python benchmarks/device_check.py sweep     OUT_DIR  # the sweep (benchmarks/device_sweep.py)
    python benchmarks/device_check.py table     OUT_DIR  # the tables of what was written
    python benchmarks/device_check.py attention OUT_DIR  # attention=xla vs cudnn, one batch
    python benchmarks/device_check.py resume    OUT_DIR  # SIGKILL at ~step 30 of 50, resume
    python benchmarks/device_check.py variant   OUT_DIR NAME [--steps N] [--set KEY=VALUE]...
                                                         # one sweep variant (the sweep runs it)
    add --smoke to run any of them small, on the CPU (checks the code, measures nothing)

The sweep appends its rows to OUT_DIR/sweep.jsonl as each variant finishes; the checks write
OUT_DIR/PIECE.json; the raw logs stay in OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import device_sweep  # noqa: E402 (after the path that finds it)


def first_step(overrides: list[str], smoke: bool) -> dict:
    """The first step's metrics (loss, gradient norm) from the untouched initial parameters."""
    import jax

    from lab.accel import sharding
    from lab.train import build_trainer

    cfg = device_sweep.load(overrides, smoke)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    batch = device_sweep.random_batch(cfg, trainer.mesh, 0)
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.train_step(trainer.init_state(), batch)
        return {k: float(v) for k, v in metrics.items()}


def attention(smoke: bool) -> list[dict]:
    """The same parameters (seed) and batch through both implementations: the first step's loss
    and gradient norm, computed before any update."""
    base = ["model.loss_chunk=0", "model.remat=none", "train.batch_size=4", "model.n_layers=4"]
    impls = ("xla", "xla") if smoke else ("xla", "cudnn")
    a, b = (first_step([*base, f"model.attention={impl}"], smoke) for impl in impls)
    rows = []
    for key in ("loss", "grad_norm"):
        rel = abs(a[key] - b[key]) / abs(a[key])
        rows.append({"figure": f"attention xla vs {impls[1]}: {key} relative difference",
                     "value": rel, "unit": "",
                     "note": f"{a[key]:.6g} vs {b[key]:.6g}; bf16 activations, ~1e-2 expected: "
                             f"{'ok' if rel < 2e-2 else 'DISAGREE'}"})
    return rows


def _lab_train(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lab.cli", "train", *args], cwd=ROOT,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def resume(smoke: bool, out: Path) -> list[dict]:
    """50 steps straight, and 50 steps killed (SIGKILL) after step 30 and rerun: every logged
    loss and the final eval loss must agree (deterministic GPU reductions for both)."""
    from lab.run import rundir
    from lab.run.metrics import read_metrics

    model = [o for o in device_sweep.SMOKE if "vocab" not in o] if smoke else [
        "model.d_model=512", "model.n_layers=8", "model.n_heads=8", "train.seq_len=1024",
        "train.batch_size=16", "model.compute_dtype=bfloat16", "model.attention=cudnn"]
    common = [str(ROOT / "configs" / "tiny.yaml"), *model,
              "train.steps=50", "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
              "schedule.warmup_steps=5", "schedule.decay_steps=10", "checkpoint.every_steps=10"]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_deterministic_ops=true").strip()
    straight, killed = out / "resume-straight", out / "resume-killed"
    log = out / "resume.log"
    if _lab_train([*common, f"run.dir={straight}"], log).wait():
        raise RuntimeError(f"the uninterrupted run failed; see {log}")
    p = _lab_train([*common, f"run.dir={killed}"], log)
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if Path(rundir.metrics_path(killed)).exists() and any(
                m["step"] >= 30 for m in read_metrics(killed)):
            break
        time.sleep(0.2)
    killed_at = max((m["step"] for m in read_metrics(killed)), default=0)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    if _lab_train([*common, f"run.dir={killed}"], log).wait():
        raise RuntimeError(f"the resumed run failed; see {log}")
    a, b = read_metrics(straight), read_metrics(killed)
    by_step = {m["step"]: m["loss"] for m in b}
    worst = max(abs(m["loss"] - by_step[m["step"]]) / abs(m["loss"]) for m in a)
    sa, sb = rundir.read_summary(straight), rundir.read_summary(killed)
    return [{"figure": "killed + resumed vs straight: worst loss difference (rel.)",
             "value": worst, "unit": "", "note": f"SIGKILL at logged step {killed_at}, "
             f"checkpoints every 10; steps {sorted(by_step) == [m['step'] for m in a]}"},
            {"figure": "killed + resumed vs straight: final eval loss",
             "value": sb.final_eval_loss, "unit": "",
             "note": f"straight {sa.final_eval_loss:.6f}, status {sb.status}"}]


CHECKS = {"attention": lambda smoke, out: attention(smoke), "resume": resume}


def table(out: Path) -> None:
    """The sweep's table (when it ran), then the checks' rows."""
    rows = device_sweep.read_rows(out)
    if rows:
        print(device_sweep.table(rows))
    for piece in CHECKS:
        path = out / f"{piece}.json"
        if not path.exists():
            print(f"{piece}: no result (not run, failed or timed out; see its log)")
            continue
        for r in json.loads(path.read_text()):
            print(f"{r['figure']:58} {r['value']:>12.4g} {r['unit']:>8}  {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=["sweep", "table", "variant", *CHECKS])
    parser.add_argument("out", type=Path)
    parser.add_argument("name", nargs="?", help="variant: its name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="variant: a config override over the preset (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="small and on the CPU")
    parser.add_argument("--budget", type=float, default=450,
                        help="sweep: seconds for all its variants (450)")
    parser.add_argument("--only", help="sweep: these variants (comma-separated names)")
    parser.add_argument("--steps", type=int, default=10, help="variant: timed steps")
    parser.add_argument("--lab-xla-flags", action="store_true",
                        help="variant: its environment has launch.gpu's XLA flags (recorded)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.piece == "table":
        table(args.out)
        return 0
    from lab.accel import compile_cache

    compile_cache.enable()
    if args.piece == "sweep":
        device_sweep.sweep(args.out, args.smoke, args.budget,
                           args.only.split(",") if args.only else None)
        return 0
    if args.piece == "variant":
        return device_sweep.run_child(args.out, args.name, args.set, args.steps,
                                      args.smoke, args.lab_xla_flags)
    rows = CHECKS[args.piece](args.smoke, args.out)
    (args.out / f"{args.piece}.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"{r['figure']}: {r['value']:.4g} {r['unit']} ({r['note']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
