"""WSD with a 20% 1-sqrt cooldown against cosine at equal steps (Hägele et al. 2024 found the
final losses equal), on the default stdlib corpus with configs/tiny.yaml.

    .venv/bin/python -m benchmarks.bench_schedules [--quick]
"""

from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, final_eval_loss, print_rows, row


def _final_loss(run_dir: Path, steps: int, schedule: dict, seed: int) -> float:
    return final_eval_loss(ROOT / "configs" / "tiny.yaml", {
        "run.seed": seed, "train.steps": steps, "train.eval_every": 0,
        "train.eval_batches": 16, "schedule.warmup_steps": 20, "schedule.final_ratio": 0,
        **schedule}, run_dir)


def run(quick: bool = False) -> list[dict]:
    steps = 100 if quick else 400
    seeds = [0] if quick else [0, 1]
    wsd_losses, cos_losses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            wsd_losses.append(_final_loss(
                Path(tmp) / f"wsd{seed}", steps, {"schedule.name": "wsd",
                                                  "schedule.decay_steps": steps // 5,
                                                  "schedule.decay_shape": "1-sqrt"}, seed))
            cos_losses.append(_final_loss(
                Path(tmp) / f"cos{seed}", steps, {"schedule.name": "cosine"}, seed))
    wsd, cos = sum(wsd_losses) / len(seeds), sum(cos_losses) / len(seeds)
    notes = (f"configs/tiny.yaml, {steps} steps, peak lr 3e-3, warmup 20, final lr 0; "
             f"mean of seeds {seeds}: WSD {[round(x, 4) for x in wsd_losses]}, "
             f"cosine {[round(x, 4) for x in cos_losses]}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [
        row("final eval loss, WSD 20% 1-sqrt cooldown", wsd, "nats/byte",
            "cosine, same steps and peak", cos, notes),
        row("peak resident memory (schedules benchmark)", rss, "MiB", "", None, "ru_maxrss"),
    ]


if __name__ == "__main__":
    print_rows("schedules", run(quick="--quick" in sys.argv))
