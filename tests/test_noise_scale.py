"""The gradient noise scale (McCandlish et al. 2018): the estimators against a known gradient
covariance, the train step's measurement, the run's metric, the fit of B_crit from it and the
plan's batch from it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from analysis.critical_batch import fit_critical_batch
from analysis.noise_scale import fit_noise_scale
from lab.cli import fit as fit_cli
from lab.cli import plan as plan_cli
from lab.optim.noise_scale import (
    GRAD_SQ,
    TRACE,
    initial_averages,
    smoothed_value,
    step_estimates,
    update_averages,
)
from lab.train.step import make_train_step
from tests.analysis_helpers import make_run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def unbiased_within(samples: np.ndarray, truth: float, rel_se: float = 0.05) -> None:
    """The mean of `samples` is `truth` within 4 standard errors, and that error is small (under
    `rel_se` of the truth), so the check can tell an unbiased estimator from a biased one."""
    se = samples.std(ddof=1) / np.sqrt(len(samples))
    assert se < rel_se * abs(truth), (se, truth)
    assert truth - 4 * se < samples.mean() < truth + 4 * se, (samples.mean(), truth, se)


# ------------------------------------------------------------------ the estimators, in closed form


def test_estimators_are_unbiased_on_gaussian_gradients():
    """Per-example gradients g ~ N(G, Σ) with Σ diagonal: E|g_B|² = |G|² + tr(Σ)/B, so the
    appendix A estimators recover |G|² and tr(Σ) on average over many steps; the naive |g_big|²
    is biased up by tr(Σ)/B_big, which the same check rejects."""
    rng = np.random.default_rng(0)
    d, b_big, micro, trials = 50, 64, 4, 4000
    G = rng.normal(0, 0.3, d)
    sd = rng.uniform(0.5, 2.0, d)
    grads = G + sd * rng.normal(size=(trials, micro, b_big // micro, d))
    small = grads.mean(axis=2)  # each micro-batch's gradient
    small_sq = (small**2).sum(-1).mean(-1)
    big_sq = (grads.mean(axis=(1, 2)) ** 2).sum(-1)
    est = step_estimates(small_sq, big_sq, b_big // micro, b_big)
    unbiased_within(est[GRAD_SQ], float(G @ G))
    unbiased_within(est[TRACE], float(sd @ sd))
    with pytest.raises(AssertionError):
        unbiased_within(big_sq, float(G @ G))  # bias tr(Σ)/64 ≈ 1.1 on |G|² ≈ 4.5


def regression_problem(d: int, delta_norm: float, sigma: float, seed: int = 0):
    """Least squares ½(w·x − y)² with x ~ N(0, I_d), y = w*·x + ε, ε ~ N(0, σ²), at
    w = w* + δ. Per example, g = x xᵀ δ − x ε: G = δ and Σ = (|δ|² + σ²) I + δδᵀ, so
    |G|² = |δ|² and tr(Σ) = d (|δ|² + σ²) + |δ|² (Gaussian fourth moments)."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=d)
    delta = rng.normal(size=d)
    delta *= delta_norm / np.linalg.norm(delta)

    def grad_fn(params, rows_BxD1):
        x, y = rows_BxD1[:, :-1], rows_BxD1[:, -1]
        def loss(p):
            return 0.5 * jnp.mean((x @ p["w"] - y) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        return (value, {"ce": value, "layer_stats": {}}), grads

    def batches(key, trials: int, b: int):
        kx, ke = jax.random.split(key)
        x = jax.random.normal(kx, (trials, b, d))
        y = x @ jnp.asarray(w_star) + sigma * jax.random.normal(ke, (trials, b))
        return jnp.concatenate([x, y[..., None]], axis=-1)

    params = {"w": jnp.asarray(w_star + delta, jnp.float32)}
    g2 = delta_norm**2
    return grad_fn, batches, params, g2, d * (g2 + sigma**2) + g2


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_the_train_step_measures_a_known_noise_scale(grad_accum):
    """The measuring step's two estimates, averaged over many batches of a least-squares
    problem with known gradient covariance, are |G|² and tr(Σ) within their standard error:
    with accumulation from its 4 micro-batches, without it from the two halves it splits the
    batch into. The update is still the mean gradient's (the same as the plain step's)."""
    grad_fn, batches, params, g2, trace = regression_problem(d=8, delta_norm=1.0, sigma=0.5)
    tx = optax.sgd(0.1)
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    measure = make_train_step(grad_fn, tx, optax.constant_schedule(0.1), grad_accum, False,
                              measure_noise=True)
    plain = make_train_step(grad_fn, tx, optax.constant_schedule(0.1), grad_accum, False)
    rows = batches(jax.random.key(grad_accum), 3000, 16)
    new, metrics = jax.jit(jax.vmap(measure, in_axes=(None, 0)))(state, rows)
    unbiased_within(np.asarray(metrics[GRAD_SQ], np.float64), g2, rel_se=0.1)
    unbiased_within(np.asarray(metrics[TRACE], np.float64), trace, rel_se=0.05)
    # B_simple = tr(Σ)/|G|² = 8 x 1.25 + 1 = 11 examples here.
    assert np.mean(metrics[TRACE]) / np.mean(metrics[GRAD_SQ]) == pytest.approx(11, rel=0.15)
    want, _ = jax.jit(jax.vmap(plain, in_axes=(None, 0)))(state, rows[:8])
    np.testing.assert_allclose(new["params"]["w"][:8], want["params"]["w"], rtol=1e-5,
                               atol=1e-6)


def test_smoothing_averages_numerator_and_denominator_apart():
    averages = initial_averages()

    def value(a):
        return float(smoothed_value(a, tokens_per_row=128))

    def update(a, grad_sq, trace):
        return update_averages(a, jnp.float32(grad_sq), jnp.float32(trace), decay=0.5)

    assert np.isnan(value(averages))  # nothing measured yet
    averages = update(averages, 4.0, 40.0)
    assert value(averages) == pytest.approx(128 * 10)  # bias-corrected: the first value as it is
    averages = update(averages, -1.0, 60.0)  # one negative |G|² estimate: the averages absorb it
    assert value(averages) == pytest.approx(128 * (0.25 * 40 + 0.5 * 60) / (0.25 * 4 - 0.5 * 1),
                                            rel=1e-6)
    averages = update(averages, -10.0, 0.0)  # the smoothed |G|² below zero: no value, not < 0
    assert np.isnan(value(averages))
    kept = update(averages, float("nan"), 1.0)  # a non-finite measurement is left out
    assert int(kept["count"]) == 3
    assert all(float(kept[k]) == float(averages[k]) for k in ("grad_sq", "trace"))


# ------------------------------------------------------------------------------- in a real run


def test_a_run_logs_the_noise_scale(tmp_path, small_data):
    """`train.noise_scale_every` through `lab train` (in this process, 8 devices, two
    micro-batches): every record from the first measurement on carries a positive noise_scale,
    the raw estimates stay out of the log, and summary.json and TensorBoard have it."""
    from lab.cli import main
    from lab.run.metrics import read_metrics

    run = tmp_path / "run"
    args = ["train", TINY, f"run.dir={run}", f"data.path={small_data}", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=2", "train.steps=6", "train.batch_size=16",
            "train.seq_len=32", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.grad_accum=2", "train.noise_scale_every=2",
            "schedule.warmup_steps=1", "schedule.decay_steps=0", "checkpoint.every_steps=4"]
    assert main(args) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert "noise_scale" not in records[0]  # nothing measured before step 2
    values = [r["noise_scale"] for r in records[1:]]
    assert all(np.isfinite(v) and v > 0 for v in values)
    assert values[0] == values[1] != values[2]  # a new value at each measuring step only
    assert not any(k.startswith("noise/") for r in records for k in r)
    assert json.loads((run / "summary.json").read_text())["noise_scale"] == values[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})  # keep all
    tb.Reload()
    assert len(tb.Tensors("train/noise_scale")) == 5
    # As if killed after step 4's checkpoint: the moving averages are in the checkpoint, so the
    # resumed run's values are the uninterrupted run's (from a fresh average, step 6's differs).
    shutil.rmtree(run / "checkpoints" / "6")
    (run / "summary.json").unlink()
    assert main(args) == 0
    assert [r.get("noise_scale") for r in read_metrics(run)] == [None] + values


@pytest.mark.slow
def test_a_checkpoint_from_before_the_averages_resumes(tmp_path, small_data, capsys):
    """A run begun with train.noise_scale_every by a version whose checkpoints lacked the
    averages (made here: a run without them, its config then marked as measuring) resumes
    at its checkpoint with fresh averages, instead of finding every checkpoint unreadable and
    starting over."""
    from lab.cli import main
    from lab.run.metrics import read_metrics

    run = tmp_path / "run"
    args = ["train", TINY, f"run.dir={run}", f"data.path={small_data}", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=2", "train.steps=6", "train.batch_size=16",
            "train.seq_len=32", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.grad_accum=2", "schedule.warmup_steps=1",
            "schedule.decay_steps=0", "checkpoint.every_steps=4"]
    assert main(args) == 0
    shutil.rmtree(run / "checkpoints" / "6")
    (run / "summary.json").unlink()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("noise_scale_every: 0", "noise_scale_every: 2"))
    capsys.readouterr()
    assert main([*args, "train.noise_scale_every=2"]) == 0
    out = capsys.readouterr()
    assert "resuming at step 4" in out.out
    assert "checkpoint 4 predates the state's 'noise'" in out.err
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [("noise_scale" in r) for r in records] == [False] * 5 + [True]  # measured at 6


@pytest.mark.slow
def test_the_noise_scale_rises_as_the_loss_falls(tmp_path, small_data):
    """The tiny config for 200 steps, measuring every 2: the noise scale grows as the loss
    falls; the last quarter's mean is well above the second quarter's, and the fitted law
    rises as the loss falls and as tokens are seen."""
    from lab.cli import main
    from lab.run.metrics import read_metrics

    run = tmp_path / "tiny"
    assert main(["train", TINY, f"run.dir={run}", f"data.path={small_data}",
                 "train.noise_scale_every=2", "train.eval_every=0", "train.eval_batches=1"]) == 0
    records = read_metrics(run)
    step = np.array([r["step"] for r in records])
    noise = np.array([r["noise_scale"] for r in records])
    loss = np.array([r["loss"] for r in records])
    second, last = (step > 50) & (step <= 100), step > 150
    assert noise[last].mean() > 3 * noise[second].mean()
    assert loss[last].mean() < loss[second].mean() - 0.1
    fit = fit_noise_scale(_curves_of(run))
    assert fit.vs_loss.exponent < -1  # rises as the loss falls
    assert fit.vs_tokens.exponent > 0


def _curves_of(run: Path):
    import pandas as pd

    from lab.run.metrics import read_metrics

    df = pd.DataFrame(read_metrics(run))
    return df.assign(run=str(run), batch_tokens=16 * 128)


# Two trainers compiled (6 s on a quiet 2-core machine, 120 s at a load average of 12): in the
# slow selection; the run above measures on 8 devices (with accumulation) by default.
@pytest.mark.slow
def test_noise_step_on_eight_devices_matches_one(small_data):
    """The measuring step (no accumulation: the batch split in two halves) gives the same
    estimates on a data x fsdp x tensor = 2 x 2 x 2 mesh as on one device."""
    from lab import data as labdata
    from lab.accel.sharding import global_batch, make_mesh
    from lab.config import load_config
    from lab.model.accounting import with_vocab
    from lab.train import build_trainer

    dataset = labdata.open_dataset(small_data)
    got = []
    for devices, mesh_keys in ((1, ["mesh.fsdp=1"]),
                               (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        cfg = load_config(TINY, [f"data.path={small_data}", "model.n_layers=1",
                                 "model.d_model=64", "train.noise_scale_every=1", *mesh_keys])
        cfg = dataclasses.replace(cfg, model=with_vocab(cfg.model, dataset.vocab_size))
        mesh = make_mesh(cfg.mesh, jax.devices()[:devices])
        trainer = build_trainer(cfg, mesh)
        batch = labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size, 0).batch(0)
        with jax.set_mesh(mesh):
            _, metrics = trainer.noise_step(trainer.init_state(), global_batch(batch, mesh))
        got.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    one, eight = got
    for key in (GRAD_SQ, TRACE, "loss", "grad_norm"):
        assert eight[key] == pytest.approx(one[key], rel=2e-3), key
    assert one[TRACE] > 0 and one[GRAD_SQ] > 0


# ------------------------------------------------------------------------- the fit and the plan
# Kaplan et al. 2020's form B = B* / L^(1/α_B), with a noise scale that also grows as a power of
# the tokens seen, B = k D^γ: then L = (B*/B)^α_B is a power law in D too.
B_STAR, ALPHA_B, K, GAMMA = 3e6, 0.25, 2.0, 0.8


def synthetic_run(noise: float, seed: int = 0, steps: int = 200, batch_tokens: int = 2048):
    rng = np.random.default_rng(seed)
    step = np.arange(1, steps + 1) * 5
    tokens = step * batch_tokens
    b = K * tokens**GAMMA
    loss = (B_STAR / b) ** ALPHA_B
    return [{"step": int(s), "tokens": int(t), "loss": float(lo),
             "noise_scale": float(v * np.exp(rng.normal(0, noise)))}
            for s, t, lo, v in zip(step, tokens, loss, b, strict=True)]


@pytest.mark.parametrize(("noise", "tol"), [(0.0, 2e-3), (0.1, 0.05)])
def test_one_run_gives_the_critical_batch_law(noise, tol):
    import pandas as pd

    curves = pd.DataFrame(synthetic_run(noise)).assign(run="r", batch_tokens=2048)
    fit = fit_critical_batch(curves)
    assert fit.law is None and fit.noise is not None  # one batch size: no sweep law
    law = fit.noise.vs_loss
    assert -1 / law.exponent == pytest.approx(ALPHA_B, rel=tol)
    assert law.coef == pytest.approx(B_STAR, rel=10 * tol)
    lo, hi = law.exponent_interval
    assert lo < -1 / ALPHA_B < hi or noise == 0
    assert fit.noise.vs_tokens.exponent == pytest.approx(GAMMA, rel=tol)
    assert fit.noise.vs_tokens.coef == pytest.approx(K, rel=10 * tol)


def test_lab_fit_and_plan_take_the_batch_from_the_noise_scale(tmp_path, monkeypatch, capsys):
    """`lab fit RUN --method critical-batch` on one run that logged a noise scale writes its
    law; `lab plan --noise-scale` takes the batch there at the predicted loss; without a
    noise-scale law --noise-scale is a one-line error."""
    monkeypatch.chdir(tmp_path)
    rows = synthetic_run(0.05)
    make_run(tmp_path / "runs", "one", N=1e6, D=rows[-1]["tokens"], loss=rows[-1]["loss"],
             batch_size=16, seq_len=128, curve=rows)
    assert fit_cli.main(["runs", "--method", "critical-batch", "--json", "cb.json"]) == 0
    out = capsys.readouterr().out
    assert "Gradient noise scale" in out and "alpha_B" in out
    cb = json.loads(Path("cb.json").read_text())
    assert cb["law"] is None
    assert cb["noise_scale"]["alpha_B"] == pytest.approx(ALPHA_B, rel=0.05)
    loss_law = {"method": "approach3", "E": 3.0, "A": 100.0, "B": 100.0, "alpha": 0.34,
                "beta": 0.28, "residuals": [0.01, -0.01] * 8, "params": "total"}
    Path("fit.json").write_text(json.dumps(loss_law))
    base = ["fit.json", "cb.json", "--budget", "1e14", "--base", TINY, "--aspect-ratio", "32"]
    assert plan_cli.main([*base, "--out", "p", "--noise-scale"]) == 0
    plan = json.loads(Path("p/plan.json").read_text())
    # The noise law at the loss the law expects at the optimum (L_opt), rounded to 8 rows.
    from analysis.predict import LossLaw

    L_opt = LossLaw.from_dict(loss_law).optimum(1e14)[2]
    want = cb["noise_scale"]["law"]["coef"] * L_opt ** cb["noise_scale"]["law"]["exponent"]
    assert want > 16 * 128 and abs(plan["batch_size"] * 128 - want) <= 4 * 128
    assert "gradient noise scale" in plan["sources"]["batch"]
    assert plan_cli.main([*base, "--out", "q"]) == 0  # without the option: the base's batch
    assert json.loads(Path("q/plan.json").read_text())["batch_size"] == 16
    assert any("--noise-scale" in w for w in json.loads(Path("q/plan.json").read_text())[
        "warnings"])
    from lab.errors import UserError

    with pytest.raises(UserError, match="--noise-scale needs"):
        plan_cli.main(["fit.json", "--budget", "1e14", "--base", TINY, "--out", "r",
                       "--noise-scale"])
    assert not Path("r").exists()
