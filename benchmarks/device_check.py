"""A short check of the lab on one NVIDIA H100/H200, one piece per call (device_check.sh runs
them, each under `timeout`, and prints the table):

    python benchmarks/device_check.py throughput OUT_DIR   # tokens/s and MFU, ~1B model
    python benchmarks/device_check.py attention  OUT_DIR   # attention=xla vs cudnn, one batch
    python benchmarks/device_check.py muon       OUT_DIR   # Muon step time against AdamW
    python benchmarks/device_check.py resume     OUT_DIR   # SIGKILL at ~step 30 of 50, resume
    python benchmarks/device_check.py table      OUT_DIR   # the table of what the pieces wrote
    add --smoke to run any piece small, on the CPU (checks the code, measures nothing)

Each piece writes OUT_DIR/PIECE.json (its rows) and prints them; the raw logs stay in OUT_DIR.
MFU is against the H100/H200 dense bfloat16 peak, 989 TFLOP/s, with the model FLOPs of
`lab.accounting.flops_per_token` (6 per weight plus causal attention), as the lab counts everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
# The ~1B model: d 2048, 16 layers, 16 heads of 128, SwiGLU, a 32K vocabulary, sequences of
# 2048, bfloat16 matmuls and activations, cuDNN attention, the loss in chunks.
BIG = ["model.d_model=2048", "model.n_layers=16", "model.n_heads=16", "model.vocab_size=32768",
       "train.seq_len=2048", "train.batch_size=8", "model.compute_dtype=bfloat16",
       "model.activation_dtype=bfloat16", "model.loss_chunk=1024", "model.remat=dots"]
SMOKE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=256",
         "train.seq_len=64", "train.batch_size=8"]


def _config(overrides: list[str]):
    from lab.config import load_config

    return load_config(None, [*overrides, "train.steps=1000", "train.log_every=1000"])


def _batch(cfg, mesh, seed: int):
    import numpy as np

    from lab import sharding

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1))
    return sharding.global_batch(tokens.astype(np.int32), mesh)


def _steps(overrides: list[str], steps: int) -> dict:
    """Build the trainer, compile, then time `steps` steps (each waited for)."""
    import jax

    from lab import sharding
    from lab.accounting import flops_per_token, param_counts
    from lab.train import build_trainer

    cfg = _config(overrides)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    batches = [_batch(cfg, trainer.mesh, i) for i in range(2)]
    state = trainer.init_state()
    started = time.perf_counter()
    with jax.set_mesh(trainer.mesh):
        state, metrics = trainer.train_step(state, batches[0])
        first = {k: float(v) for k, v in metrics.items()}  # the untouched initial parameters
        compile_s = time.perf_counter() - started
        times = []
        for i in range(steps):
            started = time.perf_counter()
            state, metrics = trainer.train_step(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    step_s = statistics.median(times)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    return {"params": param_counts(cfg.model)["params"], "step_s": step_s, "best_s": min(times),
            "tokens_per_s": tokens / step_s, "mfu": fpt * tokens / step_s / PEAK_FLOPS,
            "compile_s": compile_s, "first": first, "devices": jax.device_count(),
            "device": jax.devices()[0].device_kind}


def throughput(smoke: bool) -> list[dict]:
    r = _steps((SMOKE + ["model.attention=xla"]) if smoke else
               BIG + ["model.attention=cudnn"], 3 if smoke else 10)
    note = f"{r['params'] / 1e9:.2f}B params, {r['device']} x{r['devices']}"
    return [{"figure": "train step tokens/s (~1B, bf16, cudnn)", "value": r["tokens_per_s"],
             "unit": "tokens/s", "note": note},
            {"figure": "MFU of 989 TFLOP/s", "value": r["mfu"], "unit": "",
             "note": f"median step {r['step_s']:.3f} s (best {r['best_s']:.3f} s), first step "
                     f"{r['compile_s']:.0f} s"}]


def attention(smoke: bool) -> list[dict]:
    """The same parameters (seed) and batch through both implementations: the first step's loss
    and gradient norm, computed before any update."""
    base = SMOKE if smoke else [*BIG[:-2], "train.batch_size=4", "model.n_layers=4"]
    impls = ("xla", "xla") if smoke else ("xla", "cudnn")
    a, b = (_steps([*base, f"model.attention={impl}"], 1)["first"] for impl in impls)
    rows = []
    for key in ("loss", "grad_norm"):
        rel = abs(a[key] - b[key]) / abs(a[key])
        rows.append({"figure": f"attention xla vs {impls[1]}: {key} relative difference",
                     "value": rel, "unit": "",
                     "note": f"{a[key]:.6g} vs {b[key]:.6g}; bf16 activations, ~1e-2 expected: "
                             f"{'ok' if rel < 2e-2 else 'DISAGREE'}"})
    return rows


def muon(smoke: bool) -> list[dict]:
    """Muon's step time over AdamW's, with Newton-Schulz products in true float32 (the default)
    and with bfloat16 operands (optim.muon_ns_dtype=bfloat16)."""
    base = (SMOKE + ["model.attention=xla"]) if smoke else BIG + ["model.attention=cudnn"]
    steps = 3 if smoke else 8
    adamw = _steps([*base, "optim.name=adamw"], steps)
    rows = []
    for ns_dtype in ("float32", "bfloat16"):
        muon_ = _steps([*base, "optim.name=muon", f"optim.muon_ns_dtype={ns_dtype}"], steps)
        rows.append({"figure": f"Muon ({ns_dtype} Newton-Schulz) step / AdamW step",
                     "value": muon_["step_s"] / adamw["step_s"], "unit": "x",
                     "note": f"median Muon {muon_['step_s']:.3f} s, AdamW {adamw['step_s']:.3f} s "
                             f"a step (best {muon_['best_s']:.3f}, {adamw['best_s']:.3f}; ~1B)"})
    return rows


def _lab_train(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lab.cli", "train", *args], cwd=ROOT,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def resume(smoke: bool, out: Path) -> list[dict]:
    """50 steps straight, and 50 steps killed (SIGKILL) after step 30 and rerun: every logged
    loss and the final eval loss must agree (deterministic GPU reductions for both)."""
    from lab import rundir
    from lab.metrics import read_metrics

    model = [o for o in SMOKE if "vocab" not in o] if smoke else [
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


PIECES = {"throughput": throughput, "attention": attention, "muon": muon}


def table(out: Path) -> None:
    print(f"{'figure':58} {'value':>12} {'unit':>8}  note")
    for piece in [*PIECES, "resume"]:
        path = out / f"{piece}.json"
        if not path.exists():
            print(f"{piece + ': no result (failed or timed out; see its log)':58}")
            continue
        for r in json.loads(path.read_text()):
            print(f"{r['figure']:58} {r['value']:>12.4g} {r['unit']:>8}  {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=[*PIECES, "resume", "table"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="small and on the CPU")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.piece == "table":
        table(args.out)
        return 0
    from lab import compile_cache

    compile_cache.enable()
    rows = resume(args.smoke, args.out) if args.piece == "resume" else \
        PIECES[args.piece](args.smoke)
    (args.out / f"{args.piece}.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"{r['figure']}: {r['value']:.4g} {r['unit']} ({r['note']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
