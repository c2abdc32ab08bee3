"""Muon against AdamW on configs/tiny.yaml, each at its own tuned learning rate.

A learning-rate sweep per optimizer (configs/tiny.yaml as committed: 200 steps, WSD with a
40-step 1-sqrt decay, weight decay 0.1; Muon with Moonlight's RMS-matched scaling, so one peak
learning rate serves both its Muon and AdamW groups), final eval loss on 16 validation batches;
then each optimizer's best learning rate again at a second seed. The row compares the two tuned
optimizers: Muon's loss over AdamW's.

    .venv/bin/python -m benchmarks.bench_optimizers [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, final_eval_loss, load_note, print_rows, row

TINY = ROOT / "configs" / "tiny.yaml"
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def sweep(optimizer: str, lrs: list[float], seed: int, tmp: Path) -> dict[float, float]:
    return {lr: final_eval_loss(TINY, {"optim.name": optimizer, "optim.lr": lr,
                                       "run.seed": seed, "train.eval_every": 0,
                                       "train.eval_batches": 16},
                                tmp / f"{optimizer}-lr{lr:g}-seed{seed}")
            for lr in lrs}


def run(quick: bool = False) -> list[dict]:
    lrs = [3e-3, 3e-2] if quick else LRS
    started = time.perf_counter()
    losses, confirm = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in ("adamw", "muon"):
            losses[optimizer] = sweep(optimizer, lrs, 0, Path(tmp))
            best = min(losses[optimizer], key=losses[optimizer].get)
            confirm[optimizer] = (best, sweep(optimizer, [best], 1, Path(tmp))[best])
    seconds = time.perf_counter() - started
    rows = []
    for optimizer in ("adamw", "muon"):
        best, second = confirm[optimizer]
        rows.append(row(f"tiny.yaml, {optimizer} at its best lr ({best:g})",
                        losses[optimizer][best], "eval loss", "", None,
                        f"seed 1: {second:.4f}; sweep (seed 0): " + ", ".join(
                            f"{lr:g} {loss:.4f}" for lr, loss in losses[optimizer].items())))
    muon = (losses["muon"][confirm["muon"][0]] + confirm["muon"][1]) / 2
    adamw = (losses["adamw"][confirm["adamw"][0]] + confirm["adamw"][1]) / 2
    rows.append(row("tiny.yaml, tuned Muon vs tuned AdamW (mean of 2 seeds)", muon, "eval loss",
                    "tuned AdamW, same steps", adamw,
                    f"ratio < 1: Muon lower; {len(lrs)} lrs x 2 optimizers + 2 confirmations "
                    f"in {seconds:.0f} s; " + load_note()))
    return rows


if __name__ == "__main__":
    print_rows("optimizers", run(quick="--quick" in sys.argv))
