"""What QK-clip costs: the tiny config's CPU train step with `optim.qk_clip` off and on, in
this tree, against another commit's (one before QK-clip), in one run.

Three worker processes (benchmarks.against_commit's), each timing one step in turn, round after
round, so all see the same machine load: REF's step, this tree's with the clip off (the logit
maxima are still computed and logged) and this tree's with `optim.qk_clip=TAU`. Prints the
median and best tokens/s of each and the ratios, and writes them to
benchmarks/results/qk-clip-cost.txt.

    .venv/bin/python -m benchmarks.bench_qk_clip REF [--rounds 30] [--tau 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from benchmarks.against_commit import (
    RESULTS,
    ROOT,
    TIMED_STEPS,
    medians,
    rate_table,
    start,
    time_in_turns,
)

# A worker: the tiny config's step (one device, byte vocabulary, random tokens), timed as
# benchmarks.against_commit's are. argv: the config overrides.
WORKER = r"""
import sys, time
import jax, numpy as np
from lab.accel import sharding
from lab.config import load_config
from lab.train import build_trainer

cfg = load_config("configs/tiny.yaml", ["model.vocab_size=256", "mesh.fsdp=1", *sys.argv[1:]])
B, L = cfg.train.batch_size, cfg.train.seq_len
trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
rng = np.random.default_rng(0)
batches = [sharding.global_batch(rng.integers(0, 256, (B, L + 1), dtype=np.int32), trainer.mesh)
           for _ in range(2)]
""" + TIMED_STEPS
TOKENS = 16 * 128  # configs/tiny.yaml: batch_size x seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="a commit before QK-clip, e.g. main")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tau", type=float, default=5.0)
    args = parser.parse_args()

    def short(ref: str) -> str:
        return subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()

    sha, head = short(args.ref), short("HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(ref_tree), sha],
                       cwd=ROOT, check=True)
        try:
            workers = {
                f"{args.ref} ({sha})": start(ref_tree, "", ["-c", WORKER]),
                f"this tree ({head}), qk_clip off": start(ROOT, "", ["-c", WORKER]),
                f"this tree ({head}), qk_clip={args.tau:g}":
                    start(ROOT, "", ["-c", WORKER, f"optim.qk_clip={args.tau}"]),
            }
            times, seconds = time_in_turns(workers, args.rounds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT)
    lines = [f"$ .venv/bin/python -m benchmarks.bench_qk_clip {args.ref} --rounds {args.rounds}"
             f" --tau {args.tau:g}",
             f"train step, configs/tiny.yaml (AdamW, float32, 1 CPU device), {args.rounds} "
             f"rounds in turns, {seconds:.0f} s, load average {os.getloadavg()[0]:.1f}",
             *rate_table(times, TOKENS)]
    ref, off, on = medians(times, TOKENS).values()
    lines += [f"ratio qk_clip off / {args.ref}: {off / ref:.3f} (median)",
              f"ratio qk_clip on / qk_clip off: {on / off:.3f} (median)"]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qk-clip-cost.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
