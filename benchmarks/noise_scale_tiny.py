"""The gradient noise scale (train.noise_scale_every, lab/optim/noise_scale.py) on the tiny config:
what measuring costs, and how its critical batch compares with a batch sweep's.

- cost: the plain step and the measuring step of the tiny config, timed alternately on one
  state (same process, same batches): without accumulation the measuring step splits the batch
  in two halves; with train.grad_accum=2 it only adds a norm per micro-batch. Medians of the
  rounds, the best beside them.
- compare: the four runs of configs/sweeps/batch-noise-tiny.yaml (batch-tiny.yaml's batch
  sizes at its middle learning rate, noise scale measured every 2 steps), trained by `lab
  sweep` into DIR unless they are there already, then `lab fit DIR --method critical-batch`:
  the sweep's B_crit at its target losses beside the noise scale's, law and measured.
- identical (with --against REF): 30 steps of the tiny config with the noise scale off, here
  and at the git commit REF: every logged loss and norm must be equal, bit for bit.

    nice -n 10 .venv/bin/python -m benchmarks.noise_scale_tiny --sweep-dir DIR \\
        [--against main] [--rounds 15] [--parts compare,cost,identical] [--out FILE]

The committed record is benchmarks/results/noise-scale-tiny.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, write_report

TINY = ROOT / "configs" / "tiny.yaml"
SWEEP = ROOT / "configs" / "sweeps" / "batch-noise-tiny.yaml"


def cost(rounds: int, grad_accum: int) -> str:
    """Median seconds of the plain and the measuring step, alternated on one state."""
    from lab import backend

    backend.choose_platforms()  # no TPU backend on a host without TPU chips
    import jax

    from lab import data as labdata
    from lab.accel.sharding import global_batch, make_mesh
    from lab.config import load_config, replace
    from lab.model.accounting import with_vocab
    from lab.train import build_trainer

    cfg = load_config(TINY, ["train.noise_scale_every=1", f"train.grad_accum={grad_accum}"])
    dataset = labdata.open_dataset(labdata.default_data_path())
    cfg = replace(cfg, model={"vocab_size": with_vocab(cfg.model, dataset.vocab_size).vocab_size})
    mesh = make_mesh(cfg.mesh)
    trainer = build_trainer(cfg, mesh)
    stream = labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size, 0)
    times = {"plain": [], "measuring": []}
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        for i in range(rounds + 1):  # the first round compiles both: not counted
            for name, fn in (("plain", trainer.train_step), ("measuring", trainer.noise_step)):
                tokens = global_batch(stream.batch(i), mesh)
                t = time.perf_counter()
                state, metrics = fn(state, tokens)
                jax.block_until_ready(metrics)
                if i:
                    times[name].append(time.perf_counter() - t)
    plain, measuring = (np.asarray(times[k]) for k in ("plain", "measuring"))
    ratio = np.median(measuring) / np.median(plain)
    return (f"grad_accum={grad_accum}: plain step median {np.median(plain):.3f} s (best "
            f"{plain.min():.3f}), measuring step median {np.median(measuring):.3f} s (best "
            f"{measuring.min():.3f}); ratio of medians {ratio:.3f}, of bests "
            f"{measuring.min() / plain.min():.3f} ({rounds} rounds, alternated)")


def compare(sweep_dir: Path) -> str:
    """Train the sweep if it is not there, then the critical-batch fit with both estimates."""
    lines = []
    if not all((sweep_dir / f"bs{b}" / "summary.json").exists() for b in (8, 16, 32, 64)):
        cmd = [sys.executable, "-m", "lab.cli", "sweep", str(SWEEP), "--out", str(sweep_dir)]
        subprocess.run(cmd, cwd=ROOT, check=True)
    from analysis.inputs import load_inputs
    from analysis.methods import analyse

    done = analyse("critical-batch", load_inputs([str(sweep_dir)]), options={})
    lines.append(f"$ lab fit {sweep_dir} --method critical-batch")
    lines.append(done.text)
    lines.append("\nthe runs (wall time as their summaries count it):")
    for b in (8, 16, 32, 64):
        s = json.loads((sweep_dir / f"bs{b}" / "summary.json").read_text())
        lines.append(f"  bs{b}: {s['steps']} steps, final eval loss {s['final_eval_loss']:.4f}, "
                     f"last noise_scale {s['noise_scale']:,.0f} tokens, "
                     f"train {s['train_seconds']:.0f} s, compile {s['compile_seconds']:.0f} s")
    return "\n".join(lines)


def identical(ref: str) -> str:
    """30 tiny steps with the noise scale off, here and at `ref`: equal losses and norms."""
    args = ["configs/tiny.yaml", "train.steps=30", "schedule.warmup_steps=5",
            "schedule.decay_steps=5", "train.log_every=1", "train.eval_every=0",
            "checkpoint.every_steps=0"]
    keys = ("loss", "grad_norm", "update_norm", "param_norm")
    with tempfile.TemporaryDirectory(prefix="noise-identical-") as tmp:
        base = Path(tmp) / "ref"
        base.mkdir()
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        records = []
        for where, name in ((base, "ref"), (ROOT, "here")):
            run = Path(tmp) / f"run-{name}"
            subprocess.run([sys.executable, "-m", "lab.cli", "train", *args, f"run.dir={run}"],
                           cwd=where, check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(where)})
            records.append([json.loads(line) for line in (run / "metrics.jsonl").open()])
    same = all(a[k] == b[k] for a, b in zip(*records, strict=True) for k in keys)
    return (f"noise scale off, 30 tiny steps, here against {ref}: {len(records[0])} records, "
            f"{'every' if same else 'NOT every'} loss, grad_norm, update_norm and param_norm "
            f"bit-identical (last loss {records[0][-1]['loss']!r} and {records[1][-1]['loss']!r})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep-dir", type=Path, help="where the sweep's runs are (or go)")
    p.add_argument("--parts", default="compare,cost,identical",
                   help="which of compare, cost, identical to run (default: all)")
    p.add_argument("--against", metavar="REF", help="a git commit for the bit-identity check")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    chosen = set(args.parts.split(","))
    parts = ["$ nice -n 10 .venv/bin/python -m benchmarks.noise_scale_tiny"
             + (f" --sweep-dir {args.sweep_dir}" if args.sweep_dir else "")
             + (f" --against {args.against}" if args.against else "")
             + f" --rounds {args.rounds} --parts {args.parts}",
             time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())]
    if "compare" in chosen:
        if args.sweep_dir is None:
            p.error("--parts compare needs --sweep-dir")
        parts.append(compare(args.sweep_dir))
    if "cost" in chosen:
        parts.append("\nthe cost of measuring (tiny config, one device):")
        parts += [cost(args.rounds, accum) for accum in (1, 2)]
    if "identical" in chosen and args.against:
        parts.append(identical(args.against))
    return write_report("\n".join(parts) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
