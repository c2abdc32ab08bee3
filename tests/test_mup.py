"""μP: the coordinate check of benchmarks/bench_mup.py on a small corpus, and its helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.bench_mup import best_lr, coordinate_check, layer_activations, width_slope
from lab.config import load_config
from lab.data import TrainStream, open_dataset
from lab.model.transformer import Transformer


def test_width_slope_and_best_lr_closed_forms():
    assert width_slope({w: 3.0 * w**0.5 for w in (32, 64, 128, 256)}) == pytest.approx(0.5)
    # A parabola in log lr with its minimum at 5e-3 is found between the grid points.
    losses = {lr: 2.0 + (math.log(lr) - math.log(5e-3)) ** 2 for lr in (1e-3, 4e-3, 1.6e-2)}
    assert best_lr(losses) == pytest.approx(5e-3, rel=1e-6)
    # At the edge of the grid, or next to a diverged run, the grid point itself.
    assert best_lr({1e-3: 1.0, 2e-3: 2.0, 4e-3: 3.0}) == 1e-3
    assert best_lr({1e-3: 2.0, 2e-3: 1.0, 4e-3: math.inf}) == 2e-3


def test_layer_walk_reproduces_the_model():
    """The block-by-block walk ends in the model's own logits: it measures the real forward."""
    cfg = load_config(None, ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
                             "model.n_heads=2", "model.scan_layers=false",
                             "model.parameterization=mup", "model.mup_base_width=16"]).model
    model = Transformer(cfg, nnx.Rngs(params=0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    acts = layer_activations(model, tokens)
    assert set(acts) == {"embedding", "logits"} | {f"block{i}.{part}" for i in range(2)
                                                  for part in ("attn", "mlp", "residual")}
    np.testing.assert_allclose(acts["logits"], jnp.mean(jnp.abs(model(tokens))), rtol=1e-6)
    emb = model.embed.embedding[...][tokens]
    np.testing.assert_allclose(acts["embedding"], jnp.mean(jnp.abs(emb)), rtol=1e-6)


@pytest.mark.slow
def test_coordinate_check_is_flat_under_mup_and_not_under_sp(small_data):
    """AdamW at one learning rate, widths 32 to 256 (8x): after 3 steps every layer's mean |x|
    grows with width under SP (the hidden updates are width times too large), while under μP no
    layer moves by more than a fraction of that."""
    dataset = open_dataset(small_data)
    stream = TrainStream(dataset, 32, 8, seed=0)
    widths = [32, 64, 128, 256]
    slopes = {}
    for param in ("sp", "mup"):
        coords = coordinate_check(param, widths, 3, 1e-2, stream, dataset.vocab_size)
        last = {w: coords[w][-1] for w in widths}
        slopes[param] = {k: width_slope({w: last[w][k] for w in widths}) for k in last[32]}
        # Step 0 is the initialisation: hidden activations are width-independent in both.
        init = {w: coords[w][0]["block1.residual"] for w in widths}
        assert abs(width_slope(init)) < 0.15, (param, init)
    assert max(slopes["sp"].values()) > 1.0, slopes["sp"]
    assert max(abs(s) for s in slopes["mup"].values()) < 0.5, slopes["mup"]
