"""μP against standard parameterization (SP): the coordinate check and learning-rate transfer.

- **Coordinate check** (Yang et al. 2022): models of widths 64 to 512 (8x; 2 layers, 4 heads, so
  the head size grows with the width and the attention-logit scaling is exercised), trained with
  AdamW at one learning rate for a few steps; after each step, the mean |x| of every layer's
  output on a fixed batch: the embedding, each block's attention and MLP outputs, the residual
  stream after each block, and the logits. Under μP every curve is flat in width; under SP the
  ones after the first update grow with it. The figure of merit is the slope of log mean |x|
  against log width at the last step, steepest layer first (0 = flat).
- **Learning-rate transfer**: the final eval loss of short WSD runs over a grid of learning rates
  at three widths, under μP (base width 64) and SP. The optimum should stay put under μP and move
  under SP; the rows give each width's best learning rate, interpolated in log lr by a parabola
  through the best grid point and its neighbours.

Both use the default stdlib corpus (byte tokens). Figures go to benchmarks/results/mup-*.png,
the numbers to mup-raw.json (`-quick` in their names with --quick).

    .venv/bin/python -m benchmarks.bench_mup [--quick]     (or: make bench ONLY=mup)
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import RESULTS, final_eval_loss, load_note, print_rows, row
from lab.accel import sharding
from lab.config import load_config, override
from lab.data import TrainStream, open_dataset
from lab.data.cache import default_data_path
from lab.model.accounting import padded_vocab
from lab.model.transformer import rope_tables
from lab.train import build_trainer

COORD_WIDTHS = [64, 128, 256, 512]
COORD_LR = 1e-2
BASE_WIDTH = 64
SEQ, BATCH = 128, 16
# The model for both checks; widths and parameterization come on top.
MODEL = {"model.n_layers": 2, "model.n_heads": 4, "model.mup_base_width": BASE_WIDTH,
         "train.seq_len": SEQ, "train.batch_size": BATCH, "optim.name": "adamw",
         "optim.weight_decay": 0.0, "schedule.name": "wsd"}


def _config(width: int, parameterization: str, vocab: int, changes: dict):
    return override(load_config(None), {**MODEL, "model.d_model": width,
                                        "model.vocab_size": vocab,
                                        "model.parameterization": parameterization, **changes})


def layer_activations(model, tokens_BxL: jax.Array) -> dict[str, jax.Array]:
    """Mean |x| of each layer's output, walking an unrolled model block by block."""
    cfg = model.cfg
    sin, cos = rope_tables(tokens_BxL.shape[1], cfg.head_dim, cfg.rope_theta)
    x_BxLxD = model.embed(tokens_BxL)
    out = {"embedding": x_BxLxD}
    for i, block in enumerate(model.blocks):
        attn_BxLxD, _ = block.attn(block.attn_norm(x_BxLxD), sin, cos)
        x_BxLxD = x_BxLxD + attn_BxLxD
        mlp_BxLxD = block.mlp(block.mlp_norm(x_BxLxD))
        x_BxLxD = x_BxLxD + mlp_BxLxD
        out |= {f"block{i}.attn": attn_BxLxD, f"block{i}.mlp": mlp_BxLxD,
                f"block{i}.residual": x_BxLxD}
    out["logits"] = model(tokens_BxL)
    return {name: jnp.mean(jnp.abs(x)) for name, x in out.items()}


def coordinate_check(parameterization: str, widths: list[int], steps: int, lr: float,
                     stream: TrainStream, vocab: int) -> dict[int, list[dict[str, float]]]:
    """Per width, per step 0..steps (step t = after t updates): mean |x| of each layer, on
    `stream`'s batches of a dataset with `vocab` tokens."""
    probe = jnp.asarray(stream.batch(10_000)[:, :-1])  # one fixed batch, not trained on
    result = {}
    for width in widths:
        cfg = _config(width, parameterization, padded_vocab(vocab), {
            "train.seq_len": stream.seq_len, "train.batch_size": stream.global_batch,
            "model.scan_layers": False, "optim.lr": lr, "train.steps": steps,
            "schedule.warmup_steps": 0, "schedule.decay_steps": 0, "optim.grad_clip": 0})
        trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))

        @jax.jit
        def measure(params, graphdef=trainer.graphdef):
            return layer_activations(nnx.merge(graphdef, params), probe)

        with jax.set_mesh(trainer.mesh):
            state = trainer.init_state()
            curve = [jax.device_get(measure(state["params"]))]
            for step in range(steps):
                tokens = sharding.global_batch(stream.batch(step), trainer.mesh)
                state, _ = trainer.train_step(state, tokens)
                curve.append(jax.device_get(measure(state["params"])))
        result[width] = [{k: float(v) for k, v in c.items()} for c in curve]
    return result


def width_slope(values: dict[int, float]) -> float:
    """Least-squares slope of log value against log width."""
    widths = sorted(values)
    return float(np.polyfit(np.log(widths), np.log([values[w] for w in widths]), 1)[0])


def best_lr(losses: dict[float, float]) -> float:
    """The learning rate of least loss, refined by a parabola in log lr through the best grid
    point and its neighbours (the grid point itself at an edge of the grid)."""
    lrs = sorted(losses)
    i = min(range(len(lrs)), key=lambda j: losses[lrs[j]])
    if i in (0, len(lrs) - 1) or not all(math.isfinite(losses[lrs[j]]) for j in (i - 1, i + 1)):
        return lrs[i]
    x = np.log([lrs[i - 1], lrs[i], lrs[i + 1]])
    a, b, _ = np.polyfit(x, [losses[lrs[j]] for j in (i - 1, i, i + 1)], 2)
    return float(np.exp(np.clip(-b / (2 * a), x[0], x[2]))) if a > 0 else lrs[i]


def lr_sweep(parameterization: str, widths: list[int], lrs: list[float], steps: int,
             tmp: Path) -> dict[int, dict[float, float]]:
    """Final eval loss per width and learning rate (WSD, 10% warmup, 20% 1-sqrt decay)."""
    result = {}
    for width in widths:
        result[width] = {}
        for lr in lrs:
            changes = {**MODEL, "model.d_model": width,
                       "model.parameterization": parameterization, "optim.lr": lr,
                       "train.steps": steps, "schedule.warmup_steps": steps // 10,
                       "schedule.decay_steps": steps // 5, "schedule.decay_shape": "1-sqrt",
                       "schedule.final_ratio": 0, "train.eval_every": 0,
                       "train.eval_batches": 16, "train.log_every": 50}
            result[width][lr] = final_eval_loss(
                None, changes, tmp / f"{parameterization}-w{width}-lr{lr:g}")
    return result


def plot_coordinates(coords: dict[str, dict[int, list[dict]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = ["embedding", "block0.attn", "block1.mlp", "block1.residual", "logits"]
    fig, axes = plt.subplots(len(coords), len(layers), figsize=(3.2 * len(layers), 5.6),
                             squeeze=False)
    for r, (param, by_width) in enumerate(coords.items()):
        widths = sorted(by_width)
        steps = len(by_width[widths[0]])
        colors = plt.cm.viridis(np.linspace(0, 0.9, steps))
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            for t in range(steps):
                ax.plot(widths, [by_width[w][t][layer] for w in widths], "o-", ms=3,
                        color=colors[t], label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{param.upper()}: {layer}", fontsize=9)
            if r == len(coords) - 1:
                ax.set_xlabel("width (d_model)")
            if c == 0:
                ax.set_ylabel("mean |x|")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"coordinate check: AdamW lr {COORD_LR:g}, base width {BASE_WIDTH}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweeps: dict[str, dict[int, dict[float, float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4), sharey=True)
    for ax, (param, by_width) in zip(np.atleast_1d(axes), sweeps.items(), strict=True):
        for width, losses in sorted(by_width.items()):
            lrs = sorted(lr for lr in losses if math.isfinite(losses[lr]))
            line, = ax.plot(lrs, [losses[lr] for lr in lrs], "o-", label=f"width {width}")
            ax.axvline(best_lr(losses), color=line.get_color(), ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (AdamW)")
        ax.set_title(f"{param.upper()}", fontsize=10)
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("final eval loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> list[dict]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(default_data_path())
    stream = TrainStream(dataset, SEQ, BATCH, seed=0)
    rows = []
    steps = 3 if quick else 5
    widths = COORD_WIDTHS
    started = time.perf_counter()
    coords = {p: coordinate_check(p, widths, steps, COORD_LR, stream, dataset.vocab_size)
              for p in ("sp", "mup")}
    coord_seconds = time.perf_counter() - started
    for param, by_width in coords.items():
        last = {w: by_width[w][-1] for w in widths}
        slopes = {layer: width_slope({w: last[w][layer] for w in widths})
                  for layer in last[widths[0]]}
        worst = max(slopes, key=lambda k: abs(slopes[k]))
        rows.append(row(
            f"coordinate check {param.upper()}: steepest width slope after {steps} steps",
            slopes[worst], "log-log slope", "flat: 0", None,
            f"{worst}; logits {slopes['logits']:+.2f}, last residual "
            f"{slopes[f'block{1}.residual']:+.2f}, embedding {slopes['embedding']:+.2f}; widths "
            f"{widths[0]}-{widths[-1]}; AdamW lr {COORD_LR:g}; {coord_seconds:.0f} s for both"))
    suffix = "-quick" if quick else ""  # a quick run leaves the full run's files alone
    plot_coordinates(coords, RESULTS / f"mup-coord-check{suffix}.png")

    widths = [64, 256] if quick else [64, 128, 256]
    lrs = ([2e-3, 8e-3, 3.2e-2] if quick else [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2])
    steps = 60 if quick else 300
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sweeps = {p: lr_sweep(p, widths, lrs, steps, Path(tmp)) for p in ("sp", "mup")}
    sweep_seconds = time.perf_counter() - started
    plot_sweep(sweeps, RESULTS / f"mup-lr-sweep{suffix}.png")
    for param, by_width in sweeps.items():
        best = {w: best_lr(by_width[w]) for w in widths}
        shift = math.log2(best[widths[-1]] / best[widths[0]])
        table = "; ".join(f"w{w}: " + " ".join(
            f"{lr:g}={loss:.4f}" for lr, loss in sorted(by_width[w].items())) for w in widths)
        rows.append(row(
            f"lr transfer {param.upper()}: best lr moves from width {widths[0]} to {widths[-1]}",
            shift, "octaves (log2 ratio)", "no move: 0", None,
            "best lr " + ", ".join(f"w{w} {best[w]:.2g}" for w in widths)
            + f"; {steps} steps, batch {BATCH}x{SEQ}; final eval loss {table}"))
    rows.append(row("μP benchmark time", coord_seconds + sweep_seconds, "s", "", None,
                    f"coordinate check {coord_seconds:.0f} s, lr sweeps {sweep_seconds:.0f} s; "
                    + load_note()))
    (RESULTS / f"mup-raw{suffix}.json").write_text(json.dumps(
        {"coordinates": coords, "sweeps": {p: {str(w): {str(lr): v for lr, v in d.items()}
                                               for w, d in s.items()} for p, s in sweeps.items()}},
        indent=1))
    return rows


if __name__ == "__main__":
    print_rows("mup", run(quick="--quick" in sys.argv))
