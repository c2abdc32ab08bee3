"""Statistics reported by the blocks (lab.model.layer_stats): stacked over layers the same way under
scan and a loop, maxima maxed and means averaged over micro-batches, auxiliary losses added to
the training loss. A block that reports three statistics, declared in this file only, checks the
whole path against values computed straight from the block outputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lab.config import ModelConfig
from lab.model import transformer as lab_model
from lab.model.transformer import Transformer, loss_fn
from lab.train.step import make_train_step

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4)
AUX_WEIGHT = 0.01


class ReportingBlock(lab_model.Block):
    def __call__(self, x, sin, cos):
        x, stats = super().__call__(x, sin, cos)
        x32 = x.astype(jnp.float32)
        return x, {**stats, "max_abs": jnp.max(jnp.abs(x32)), "mean_sq": jnp.mean(x32 ** 2),
                   "aux_loss": AUX_WEIGHT * jnp.mean(x32 ** 2)}


@pytest.fixture
def reporting(monkeypatch):
    monkeypatch.setattr(lab_model, "Block", ReportingBlock)


def block_outputs(model: Transformer, tokens_BxL) -> list[np.ndarray]:
    """Every block's output, computed layer by layer outside the model's own loop."""
    sin, cos = lab_model.rope_tables(tokens_BxL.shape[1], model.cfg.head_dim, model.cfg.rope_theta)
    x = model.embed(tokens_BxL).astype(model.cfg.activation_dtype)
    outs = []
    for block in model.blocks:
        x, _ = block(x, sin, cos)
        outs.append(np.asarray(x, np.float64))
    return outs


def test_stats_stack_over_layers_and_aux_loss_joins_the_loss(reporting):
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    unrolled = Transformer(dataclasses.replace(BASE, scan_layers=False), nnx.Rngs(0))
    scanned = Transformer(BASE, nnx.Rngs(0))
    outs = block_outputs(unrolled, tokens[:, :-1])
    want_max = [np.abs(o).max() for o in outs]
    want_sq = [np.mean(o ** 2) for o in outs]
    for model in (unrolled, scanned):
        loss, aux = loss_fn(model, tokens)
        stats = aux["layer_stats"]
        np.testing.assert_allclose(np.asarray(stats["max_abs"]), want_max, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(stats["mean_sq"]), want_sq, rtol=1e-5)
        np.testing.assert_allclose(float(loss), float(aux["ce"]) + AUX_WEIGHT * sum(want_sq),
                                   rtol=1e-6)


def test_micro_batches_max_the_maxima_and_average_the_rest(reporting):
    model = Transformer(BASE, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    grad_fn = jax.value_and_grad(lambda p, t: loss_fn(nnx.merge(graphdef, p), t), has_aux=True)
    tokens = jax.random.randint(jax.random.key(2), (4, 9), 0, 64)
    tx, schedule = optax.sgd(0.0), optax.constant_schedule(0.0)
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    _, metrics = make_train_step(grad_fn, tx, schedule, 2, False)(state, tokens)
    # Micro-batch a holds rows a, a+2 (lab.train.step).
    per_micro = [loss_fn(model, tokens[a::2])[1]["layer_stats"] for a in range(2)]
    np.testing.assert_allclose(float(metrics["max_abs"]),
                               max(float(s["max_abs"].max()) for s in per_micro), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mean_sq"]),
                               np.mean([np.asarray(s["mean_sq"]).mean() for s in per_micro]),
                               rtol=1e-5)
    # Without micro-batches the step reports the batch's own statistics.
    _, whole = make_train_step(grad_fn, tx, schedule, 1, False)(state, tokens)
    stats = loss_fn(model, tokens)[1]["layer_stats"]
    np.testing.assert_allclose(float(whole["max_abs"]), float(stats["max_abs"].max()), rtol=1e-6)


def test_a_model_without_stats_adds_no_metrics():
    model = Transformer(BASE, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    grad_fn = jax.value_and_grad(lambda p, t: loss_fn(nnx.merge(graphdef, p), t), has_aux=True)
    tx = optax.sgd(0.0)
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    tokens = jax.random.randint(jax.random.key(3), (4, 9), 0, 64)
    for accum in (1, 2):
        _, metrics = make_train_step(grad_fn, tx, optax.constant_schedule(0.0), accum,
                                     False)(state, tokens)
        assert set(metrics) == {"loss", "lr", "grad_norm", "update_norm", "param_norm"}
