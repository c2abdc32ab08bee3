"""The device sweep: the ~1B train step of configs/gpu/1b.yaml (the baseline), then one change
at a time, each in its own Python process under its own time limit, in at most 8 minutes on one
H100 or H200 (benchmarks/device_check.sh runs it):

    python benchmarks/device_check.py sweep OUT [--budget 450] [--only NAME,...] [--smoke]

Each variant appends its row (median and best step time, tokens/s, MFU, peak memory) to
OUT/sweep.jsonl the moment it finishes, so a sweep cut short keeps what it measured; a variant
that fails, runs out of memory or out of time gets a row saying so, and the sweep goes on. The
variants that beat the baseline are then tried together ("combined"), and the sweep ends with
one table, the fastest variant and the overrides that make configs/gpu/1b.yaml that variant.
Muon is timed against AdamW at the same `train.grad_accum`, at least 0.5M tokens per optimizer
step. MFU is against the H100/H200 dense bfloat16 peak, 989 TFLOP/s, with the model FLOPs of
`lab.model.accounting.flops_per_token` (6 per weight plus causal attention).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "gpu" / "1b.yaml"
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
ACCUM_TOKENS = 2 ** 19  # 524,288: the issue's 0.5M tokens per optimizer step
MUON_TARGET = 1.10  # Muon's step over AdamW's at ACCUM_TOKENS (issue 22)
# --smoke: the preset shrunk to a CPU-sized model (it checks the code and measures nothing).
SMOKE = ("model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=256",
         "train.seq_len=64", "train.batch_size=8", "model.attention=xla",
         "model.compute_dtype=float32", "model.activation_dtype=float32", "model.loss_chunk=128")
ROWS = "sweep.jsonl"
GAIN = 1.01  # a variant "helps" when its tokens/s beat the baseline's by more than 1%


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()  # dotted key=value over the preset
    xla_flags: bool = False  # launch.gpu's XLA GPU flags in the environment
    timed_steps: int = 10  # after the compiling first step
    limit_s: float = 60  # the process is killed after this
    group: str = "step"  # step: a candidate for the preset; optimizer: Muon against AdamW
    note: str = ""


def load(overrides, smoke: bool):
    """The preset with the smoke's and the variant's overrides, validated (UserError if not)."""
    from lab.config import load_config

    return load_config(str(PRESET), [*(SMOKE if smoke else ()), *overrides])


def plan(smoke: bool) -> list[Variant]:
    """The variants, baseline first; each changes one thing from the preset's values."""
    m, t = (cfg := load([], smoke)).model, cfg.train
    n = 3 if smoke else 10
    out = [Variant("baseline", timed_steps=n, note="configs/gpu/1b.yaml as it is")]
    # bf16 backward: the key's default decides which side is the change (listed even before the
    # key exists, so the row says it is missing rather than the variant silently vanishing)
    current = getattr(m, "backward_dtype", "float32")
    other = "float32" if current == "compute" else "compute"
    out.append(Variant(f"backward-{other}", (f"model.backward_dtype={other}",), timed_steps=n))
    out += [Variant(f"remat-{r}", (f"model.remat={r}",), timed_steps=n)
            for r in ("none", "auto") if r != m.remat]
    out.append(Variant("batch-x2", (f"train.batch_size={2 * t.batch_size}",), timed_steps=n,
                       limit_s=75))
    if m.loss_chunk:
        out.append(Variant("loss-chunk-x4", (f"model.loss_chunk={4 * m.loss_chunk}",),
                           timed_steps=n))
    out.append(Variant("xla-flags", xla_flags=True, timed_steps=n,
                       note="python -m launch.gpu's XLA GPU flags"))
    return out + accum_variants(t.batch_size, t.seq_len, smoke)


def accum_variants(batch: int, seq_len: int, smoke: bool) -> list[Variant]:
    """AdamW, Muon with bfloat16 and with float32 Newton-Schulz, each with at least 0.5M tokens
    per optimizer step (2 micro-batches in the smoke) accumulated over micro-batches of the
    preset's batch."""
    k = 2 if smoke else math.ceil(ACCUM_TOKENS / (batch * seq_len))
    accum = (f"train.batch_size={k * batch}", f"train.grad_accum={k}")
    note = f"{k * batch * seq_len:,} tokens per optimizer step, {k} micro-batches"
    return [Variant(f"{name}-accum{k}", (*accum, *opt), timed_steps=2, limit_s=limit,
                    group="optimizer", note=note)
            for name, opt, limit in (
                ("adamw", ("optim.name=adamw",), 90),
                ("muon-bf16", ("optim.name=muon", "optim.muon_ns_dtype=bfloat16"), 90),
                ("muon-f32", ("optim.name=muon", "optim.muon_ns_dtype=float32"), 100))]


# ----------------------------------------------------------------------------- one variant (child)


def random_batch(cfg, mesh, seed: int):
    """A global batch of random tokens, (batch_size, seq_len + 1), sharded over `mesh`."""
    import numpy as np

    from lab.accel import sharding

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1))
    return sharding.global_batch(tokens.astype(np.int32), mesh)



def measure(overrides: list[str], timed_steps: int, smoke: bool) -> dict:
    """Build the trainer, run the compiling first step, then time `timed_steps` steps (each
    waited for): the row's figures."""
    import jax

    from lab.accel import sharding
    from lab.model.accounting import flops_per_token, param_counts
    from lab.train import build_trainer

    cfg = load(overrides, smoke)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    batches = [random_batch(cfg, trainer.mesh, i) for i in range(2)]
    state = trainer.init_state()
    started = time.perf_counter()
    with jax.set_mesh(trainer.mesh):
        state, metrics = trainer.train_step(state, batches[0])
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - started
        times = []
        for i in range(timed_steps):
            started = time.perf_counter()
            state, metrics = trainer.train_step(state, batches[(i + 1) % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    step_s = statistics.median(times)
    stats = jax.local_devices()[0].memory_stats()  # None on a CPU: the process's peak RSS then
    peak = stats.get("peak_bytes_in_use") if stats else None
    return {"status": "ok", "step_s": step_s, "best_s": min(times), "steps": len(times),
            "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
            "mfu": flops_per_token(cfg.model, cfg.train.seq_len) * tokens / step_s / PEAK_FLOPS,
            "peak_gb": (peak if peak is not None else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9,
            "peak_of": "device" if peak is not None else "host RSS",
            "compile_s": compile_s, "params": param_counts(cfg.model)["params"],
            "loss": float(metrics["loss"]), "device": jax.devices()[0].device_kind}


def append_row(out: Path, row: dict) -> None:
    """One JSON line, flushed to disk at once: what is written survives a kill that follows."""
    with (out / ROWS).open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_child(out: Path, name: str, overrides: list[str], timed_steps: int, smoke: bool,
              lab_xla_flags: bool = False) -> int:
    """The child process's work: measure, and append the row (a failure's row too)."""
    row = {"variant": name, "overrides": overrides, "lab_xla_flags": lab_xla_flags,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        row |= measure(overrides, timed_steps, smoke)
    except Exception as e:  # noqa: BLE001 (an out-of-memory or compile error is a row)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        row |= {"status": f"failed: {first[:200]}"}
    append_row(out, row)
    return 0 if row["status"] == "ok" else 1


# ----------------------------------------------------------------------------- the sweep (parent)


def variant_env(variant: Variant, base: dict[str, str]) -> dict[str, str]:
    """The child's environment: with the variant's XLA flags merged under the user's own."""
    from launch.gpu import default_xla_flags, merge_xla_flags

    env = dict(base)
    if variant.xla_flags:
        env["XLA_FLAGS"] = " ".join(merge_xla_flags(default_xla_flags(),
                                                    base.get("XLA_FLAGS", "").split()))
    return env


def run_variant(variant: Variant, out: Path, smoke: bool, limit_s: float) -> dict:
    """Run one variant in its own process, killed after `limit_s`; return its row (written by
    the child, or here when the child wrote none)."""
    from lab.errors import UserError

    row = {"variant": variant.name, "overrides": list(variant.overrides),
           "lab_xla_flags": variant.xla_flags}
    try:
        load(variant.overrides, smoke)
    except UserError as e:  # e.g. a key another branch adds, not merged yet
        row["status"] = f"skipped: {e}"
        append_row(out, row)
        return row
    before = len(read_rows(out))
    command = [sys.executable, str(Path(__file__).with_name("device_check.py")), "variant",
               str(out), variant.name, "--steps", str(variant.timed_steps),
               *(["--smoke"] if smoke else []),
               *(["--lab-xla-flags"] if variant.xla_flags else []),
               *(f"--set={o}" for o in variant.overrides)]
    started = time.monotonic()
    with (out / f"{variant.name}.log").open("w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=variant_env(variant, dict(os.environ)),
                                  timeout=limit_s).returncode
            status = f"failed: exit status {code}, no row (see {variant.name}.log)"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit_s:g} s"
    rows = read_rows(out)
    if len(rows) > before:
        return rows[-1]
    row |= {"status": status, "wall_s": time.monotonic() - started}
    append_row(out, row)
    return row


def read_rows(out: Path) -> list[dict]:
    path = out / ROWS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def combined(variants: list[Variant], rows: list[dict]) -> Variant | None:
    """The step variants that beat the baseline by more than GAIN, together (of two that set
    the same key, the faster); None when fewer than two helped."""
    speed = {r["variant"]: r["tokens_per_s"] for r in rows if r.get("status") == "ok"}
    if "baseline" not in speed:
        return None
    helped = sorted((v for v in variants if v.group == "step" and v.name != "baseline"
                     and speed.get(v.name, 0) > GAIN * speed["baseline"]),
                    key=lambda v: -speed[v.name])
    by_key: dict[str, str] = {}
    for v in helped:
        for o in v.overrides:
            by_key.setdefault(o.split("=", 1)[0], o)
    if len(helped) < 2:
        return None
    return Variant("combined", tuple(by_key.values()), xla_flags=any(v.xla_flags for v in helped),
                   timed_steps=helped[0].timed_steps, limit_s=75,
                   note="+".join(v.name for v in helped))


def sweep(out: Path, smoke: bool, budget_s: float, only: list[str] | None = None,
          limits: dict[str, float] | None = None) -> list[dict]:
    """Every variant (or those in `only`) within `budget_s` seconds in all; `limits` lowers a
    variant's own time limit. Prints the table and returns the rows."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    variants, rows, tried_together = plan(smoke), [], bool(only)
    queue = [v for v in variants if not only or v.name in only]
    while queue:
        variant = queue.pop(0)
        left = deadline - time.monotonic()
        limit = min(variant.limit_s * (3 if smoke else 1), left,
                    (limits or {}).get(variant.name, math.inf))
        if left < 5:
            row = {"variant": variant.name, "overrides": list(variant.overrides),
                   "status": f"not run: the sweep's {budget_s:.0f} s were spent"}
            append_row(out, row)
        else:
            print(f"--- {variant.name} (at most {limit:.0f} s)", flush=True)
            row = run_variant(variant, out, smoke, limit)
        rows.append(row)
        print(f"    {row['status']}", flush=True)
        if not tried_together and not any(v.group == "step" for v in queue):
            tried_together, extra = True, combined(variants, rows)
            if extra:
                queue.insert(0, extra)
    print(table(read_rows(out)), flush=True)
    return rows


# ----------------------------------------------------------------------------- the table


def _cell(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """The sweep's table, the fastest step variant with its overrides, and Muon's ratios."""
    by_name = {r["variant"]: r for r in rows}  # a rerun variant: its last row
    base = by_name.get("baseline", {}).get("tokens_per_s")
    lines = [f"{'variant':18} {'median s':>9} {'best s':>8} {'tokens/step':>11} "
             f"{'tokens/s':>10} {'MFU':>6} {'peak GB':>8} {'x base':>7}  status"]
    for r in by_name.values():
        ok = r.get("status") == "ok"
        speed = r.get("tokens_per_s") if ok else None
        lines.append(
            f"{r['variant']:18} {_cell(r.get('step_s'), '9.3f')} {_cell(r.get('best_s'), '8.3f')} "
            f"{_cell(r.get('tokens_per_step'), '11,d')} {_cell(speed, '10,.0f')} "
            f"{_cell(r.get('mfu') if ok else None, '6.1%')} {_cell(r.get('peak_gb'), '8.1f')} "
            f"{_cell(speed / base if speed and base else None, '7.3f')}  {r['status']}")
    return "\n".join([*lines, "", *verdict(by_name)])


def verdict(by_name: dict[str, dict]) -> list[str]:
    """The fastest step variant and what configs/gpu/1b.yaml needs to become it; Muon's cost."""
    ok = {n: r for n, r in by_name.items() if r.get("status") == "ok"}
    steps = [r for n, r in ok.items() if not r.get("overrides") or not any(
        o.startswith("train.grad_accum=") for o in r["overrides"])]
    lines = []
    if steps:
        best = max(steps, key=lambda r: r["tokens_per_s"])
        lines.append(f"fastest: {best['variant']}, {best['tokens_per_s']:,.0f} tokens/s, "
                     f"MFU {best['mfu']:.1%}")
        if best["variant"] == "baseline":
            lines.append("configs/gpu/1b.yaml stays as it is")
        else:
            extra = " and run it through python -m launch.gpu (its XLA flags)" \
                if best.get("lab_xla_flags") else ""
            lines.append("configs/gpu/1b.yaml becomes it with: "
                         + (" ".join(best["overrides"]) or "(no config change)") + extra)
    adamw = next((r for n, r in ok.items() if n.startswith("adamw-accum")), None)
    for n, r in ok.items():
        if adamw and n.startswith("muon-"):
            ratio = r["step_s"] / adamw["step_s"]
            lines.append(f"{n} / {adamw['variant']}: {ratio:.3f}x a step at "
                         f"{r['tokens_per_step']:,} tokens (target <= {MUON_TARGET}: "
                         f"{'met' if ratio <= MUON_TARGET else 'missed'})")
    return lines
