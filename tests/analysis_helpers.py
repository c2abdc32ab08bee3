"""Fake run directories and points for the analysis tests (the layout of docs/training.md)."""

import json
from pathlib import Path

import numpy as np
import yaml

from analysis.approach3 import law

# A Chinchilla-like law (Besiroglu et al.'s estimates) used as ground truth.
TRUTH = (1.82, 482.0, 2085.0, 0.348, 0.366)  # E, A, B, alpha, beta


def make_run(
    root: Path,
    name: str,
    *,
    N: float,
    D: float,
    loss: float | None,
    status: str = "finished",
    flops: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 8,
    seq_len: int = 512,
    curve: list[dict] | None = None,
    config: bool = True,
    **summary_extra,
) -> Path:
    """A run directory with summary.json, config.yaml and (optionally) metrics.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "params": float(N),
        "non_embedding_params": 0.8 * float(N),
        "tokens": float(D),
        "flops": 6 * float(N) * float(D) if flops is None else flops,
        "final_eval_loss": None if loss is None else float(loss),
        "status": status,
        **summary_extra,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if config:
        cfg = {
            "run": {"dir": str(run), "seed": 0},
            "train": {"steps": 100, "batch_size": int(batch_size), "seq_len": int(seq_len)},
            "optim": {"name": "adamw", "lr": float(lr)},
            "schedule": {"name": "wsd", "decay_shape": "1-sqrt", "decay_steps": 20},
        }
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if curve is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
    return run


def law_points(rng, n: int, noise: float = 0.003):
    """n (N, D, loss) points of TRUTH over 2 decades of N and 3 of D, with log-normal noise."""
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e9), n))
    D = np.exp(rng.uniform(np.log(1e8), np.log(1e11), n))
    return N, D, law(N, D, *TRUTH) * np.exp(rng.normal(0, noise, n))
