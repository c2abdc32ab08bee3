"""The optimizer from the config: routing by declared role, AdamW equivalence, Muon group, μP
scales."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lab.config import Config, OptimConfig, ScheduleConfig, TrainConfig, validate
from lab.errors import UserError
from lab.model.roles import LAYERS, ParamSpec, Role, param, specs_of
from lab.model.transformer import Embed, RMSNorm
from lab.optim.muon import NS_COEFFS
from lab.optim.optimizers import (
    build_optimizer,
    describe_routing,
    lr_schedule,
    param_labels,
    path_names,
    weight_decay_mask,
)
from lab.optim.schedules import cosine, wsd

V, D, H, F, L = 32, 16, 24, 40, 3  # vocab, d_model, heads*head_dim, mlp width, layers

HIDDEN_SHAPES = {"wq": (D, H), "wk": (D, H), "wv": (D, H), "wo": (H, D)}
MLP_SHAPES = {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
AXES = {"wq": ("embed", "heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
        "wo": ("heads", "embed"), "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"),
        "w_down": ("mlp", "embed")}


def block_tree(lead=()):
    """One block's parameters named and declared as the lead's model does; `lead` prefixes
    each shape (the layer stack)."""
    def ones(axes, role, *shape):
        return param(jnp.ones(lead + shape), (LAYERS,) * len(lead) + axes, role)

    def norm(dim):
        return {"scale": ones(("norm",), Role.NORM, dim)}

    attn = {k: ones(AXES[k], Role.HIDDEN, *s) for k, s in HIDDEN_SHAPES.items()}
    attn |= {"q_norm": norm(8), "k_norm": norm(8)}
    return {
        "attn_norm": norm(D),
        "attn": attn,
        "mlp_norm": norm(D),
        "mlp": {k: ones(AXES[k], Role.HIDDEN, *s) for k, s in MLP_SHAPES.items()},
    }


def unrolled_tree(head=True):
    """(arrays, ParamSpecs) of a model with unrolled layers."""
    tree = {
        "embed": {"embedding": param(jnp.ones((V, D)), ("vocab", "embed"), Role.EMBEDDING)},
        "blocks": {i: block_tree() for i in range(L)},
        "final_norm": {"scale": param(jnp.ones(D), ("norm",), Role.NORM)},
    }
    if head:
        tree["head"] = {"kernel": param(jnp.ones((D, V)), ("embed", "vocab"), Role.HEAD)}
    return split(tree)


def scanned_tree():
    """(arrays, ParamSpecs) of a model with its layers stacked."""
    tree = {
        "embed": {"embedding": param(jnp.ones((V, D)), ("vocab", "embed"), Role.EMBEDDING)},
        "blocks": block_tree(lead=(L,)),
        "final_norm": {"scale": param(jnp.ones(D), ("norm",), Role.NORM)},
        "head": {"kernel": param(jnp.ones((D, V)), ("embed", "vocab"), Role.HEAD)},
    }
    return split(tree)


def split(tree):
    """The arrays and the ParamSpecs of a tree of declared parameters."""
    arrays = jax.tree.map(lambda p: p[...], tree, is_leaf=lambda x: isinstance(x, nnx.Param))
    return arrays, specs_of(tree)


def expected_label(names):
    hidden = names[0] == "blocks" and names[-1] in {*HIDDEN_SHAPES, *MLP_SHAPES}
    return "muon" if hidden else "adamw"


def flat(tree):
    return {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize(
    "make, n_muon",
    [(unrolled_tree, 7 * L), (scanned_tree, 7), (lambda: unrolled_tree(head=False), 7 * L)],
)
def test_routing_by_role(make, n_muon):
    params, specs = make()
    labels = flat(param_labels(specs))
    assert labels == {names: expected_label(names) for names in flat(params)}
    assert list(labels.values()).count("muon") == n_muon
    # The trap of rank-based routing: stacked norm scales are 2-D, stacked kernels 3-D.
    if n_muon == 7:
        assert labels[("blocks", "attn_norm", "scale")] == "adamw"
        assert labels[("blocks", "mlp", "w_down")] == "muon"
    decay = flat(weight_decay_mask(specs))
    for names, leaf in flat(params).items():
        assert decay[names] == (names[-1] != "scale"), names
        assert leaf.ndim >= 2 or not decay[names]


def test_describe_routing_folds_layers():
    text = describe_routing(*unrolled_tree())
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
    assert rows["blocks/*/mlp/w_up"][-3:] == [str(L), "muon", "yes"]
    assert rows["blocks/*/attn_norm/scale"][-3:] == [str(L), "adamw", "no"]
    assert rows["embed/embedding"][-2:] == ["adamw", "yes"]
    # embed, head, final norm; per block 4 attention matrices, 2 qk norms, 2 norms, 3 mlp
    assert len(rows) == 3 + 4 + 2 + 2 + 3


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn_norm = RMSNorm(D, 1e-6)
        self.wq = param(jax.random.normal(rngs.params(), (D, H)), ("embed", "heads"),
                        Role.HIDDEN)


class Model(nnx.Module):
    """A tiny NNX module with the lead's names, to check State trees and nnx.Optimizer."""

    def __init__(self, rngs):
        self.embed = Embed(V, D, 1.0, rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])

    def __call__(self, tokens):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = x + blk.attn_norm(x) @ blk.wq[...] @ blk.wq[...].T
        return jnp.mean(x**2)


def test_nnx_state_routing_and_optimizer():
    model = Model(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)  # leaves inside Variables
    specs = specs_of(state)
    labels = flat(param_labels(specs))
    assert labels[("blocks", 0, "wq")] == "muon"
    assert labels[("blocks", 1, "attn_norm", "scale")] == "adamw"
    assert labels[("embed", "embedding")] == "adamw"
    assert set(labels) == set(flat(state))
    cfg = OptimConfig(name="muon", lr=0.01)
    tx = build_optimizer(cfg, ScheduleConfig(), 10, specs)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = np.asarray(model.blocks[0].wq[...])
    grads = nnx.grad(lambda m: m(jnp.arange(8)[None]))(model)
    opt.update(model, grads)
    moved = np.asarray(model.blocks[0].wq[...]) - before
    # Without the decay term, a Muon step of a (16, 24) matrix at lr 0.01 is 0.01 * 0.2 sqrt(24)
    # times an orthogonalised matrix: 16 singular values in [0.68, 1.14], so an RMS in
    # 0.01 * 0.2 * sqrt(24) * [0.68, 1.14] / sqrt(24) = [0.00136, 0.00228].
    rms = np.sqrt(np.mean((moved + 0.01 * 0.1 * before) ** 2))
    assert 0.00136 < rms < 0.00228


def random_like(tree, seed, std=1.0):
    """Gaussian leaves from numpy (no per-shape compilation, which dominates these tests)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.normal(size=x.shape), x.dtype), tree)


def run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


SCHED = ScheduleConfig(name="wsd", warmup_steps=2, decay_steps=3, decay_shape="1-sqrt")


def test_adamw_equals_optax_adamw():
    params, specs = scanned_tree()
    params = random_like(params, 0)
    grads_seq = [random_like(params, s, std=3.0) for s in (1, 2, 3, 4)]
    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.1, grad_clip=1.0)
    ours = run(build_optimizer(cfg, SCHED, 6, specs), params, grads_seq)
    mask = jax.tree.map(lambda x: x.ndim >= 2, params)
    mask["blocks"]["attn_norm"]["scale"] = mask["blocks"]["mlp_norm"]["scale"] = False
    mask["blocks"]["attn"]["q_norm"]["scale"] = mask["blocks"]["attn"]["k_norm"]["scale"] = False
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(wsd(0.01, 6, 2, 3, "1-sqrt"), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                    mask=mask),
    )
    theirs = run(reference, params, grads_seq)
    for (names, a), b in zip(flat(ours).items(), flat(theirs).values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(names))
    # The clip mattered: without it the result differs.
    unclipped = run(build_optimizer(dataclasses.replace(cfg, grad_clip=0.0), SCHED, 6, specs),
                    params, grads_seq)
    assert not np.allclose(unclipped["embed"]["embedding"], ours["embed"]["embedding"])


def ns64(x):
    a, b, c = NS_COEFFS
    x = np.asarray(x, np.float64)
    tall = x.shape[-2] > x.shape[-1]
    x = np.swapaxes(x, -1, -2) if tall else x
    x = x / np.linalg.norm(x, axis=(-2, -1), keepdims=True)
    for _ in range(5):
        g = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * g + c * g @ g) @ x
    return np.swapaxes(x, -1, -2) if tall else x


@pytest.mark.parametrize("make", [unrolled_tree, scanned_tree])
def test_first_step_of_each_group_in_closed_form(make):
    """Step 0 at lr = peak: AdamW moves by lr * (g / (|g| + eps) + wd W); Muon by
    lr * ratio * (0.2 sqrt(max(fan_in, fan_out)) NS(g) + wd W), NS in float64 here."""
    params, specs = make()
    params = random_like(params, 5)
    grads = random_like(params, 6, std=1e-3)  # global norm < 1: no clip
    assert optax.tree.norm(grads) < 1.0
    lr, wd, ratio, eps = 0.02, 0.1, 0.5, 1e-8
    cfg = OptimConfig(name="muon", lr=lr, weight_decay=wd, muon_lr_ratio=ratio, eps=eps)
    new = flat(run(build_optimizer(cfg, ScheduleConfig(), 10, specs), params, [grads]))
    p0, g0 = flat(params), flat(grads)
    decay = flat(weight_decay_mask(specs))
    for names, w in p0.items():
        w64, g64 = np.asarray(w, np.float64), np.asarray(g0[names], np.float64)
        if expected_label(names) == "muon":
            scale = 0.2 * np.sqrt(max(w.shape[-2:]))
            want = w64 - lr * ratio * (scale * ns64(g64) + wd * w64)
        else:
            want = w64 - lr * (g64 / (np.abs(g64) + eps) + wd * decay[names] * w64)
        np.testing.assert_allclose(np.asarray(new[names]), want, atol=3e-6, err_msg=str(names))


@pytest.mark.parametrize("ns_dtype, low, high", [("float32", 0.0, 3e-5),
                                                   ("bfloat16", 1e-3, 3.5e-2)])
def test_muon_ns_dtype_reaches_newton_schulz(ns_dtype, low, high):
    """optim.muon_ns_dtype sets the operands of every Newton-Schulz product: float32 ones ask
    for HIGHEST (true float32), bfloat16 ones carry bf16; the first Muon step against float64
    is within that dtype's error (the bounds of test_muon's preset-shape table) and, for
    bfloat16, measurably off (so the setting did reach the products)."""
    params, specs = scanned_tree()
    params = random_like(params, 5)
    grads = random_like(params, 6, std=1e-3)
    lr, wd = 0.02, 0.1
    cfg = OptimConfig(name="muon", lr=lr, weight_decay=wd, muon_ns_dtype=ns_dtype)
    opt = build_optimizer(cfg, ScheduleConfig(), 10, specs)
    lowered = jax.jit(opt.update).lower(grads, opt.init(params), params).as_text()
    dots = [line for line in lowered.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all(("bf16" in d) == (ns_dtype == "bfloat16") for d in dots)
    assert all(("HIGHEST" in d) == (ns_dtype == "float32") for d in dots)
    new, p0, g0 = flat(run(opt, params, [grads])), flat(params), flat(grads)
    for names, w in p0.items():
        if expected_label(names) != "muon":
            continue
        w64, g64 = np.asarray(w, np.float64), np.asarray(g0[names], np.float64)
        step = (w64 - np.asarray(new[names], np.float64)) / lr - wd * w64
        want = 0.2 * np.sqrt(max(w.shape[-2:])) * ns64(g64)
        err = np.linalg.norm(step - want) / np.linalg.norm(want)
        assert low <= err < high, (names, err)


@pytest.mark.parametrize("platform, bf16", [("cpu", False), ("gpu", True), ("tpu", True)])
def test_muon_ns_dtype_auto_follows_the_platform(platform, bf16):
    """optim.muon_ns_dtype=auto (the default) gives bfloat16 Newton-Schulz operands on GPU and
    TPU and true float32 ones on a CPU, where the lab's CPU results stay as they were."""
    params, specs = scanned_tree()
    cfg = OptimConfig(name="muon")
    assert cfg.muon_ns_dtype == "auto"
    opt = build_optimizer(cfg, ScheduleConfig(), 10, specs, platform=platform)
    lowered = jax.jit(opt.update).lower(params, opt.init(params), params).as_text()
    dots = [line for line in lowered.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all(("bf16" in d) == bf16 and ("HIGHEST" in d) != bf16 for d in dots)


def test_lr_scales_scale_the_whole_update_including_decay():
    """A leaf with scale s moves exactly as under optax.adamw with learning rate s * lr."""
    params, specs = unrolled_tree()
    params = random_like(params, 7)
    grads_seq = [random_like(params, s) for s in (8, 9, 10)]
    scales = jax.tree_util.tree_map_with_path(
        lambda path, _: 0.25 if path_names(path)[-1] in MLP_SHAPES else 1.0, params
    )
    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.5, grad_clip=0.0)
    ours = flat(run(build_optimizer(cfg, SCHED, 6, specs, lr_scales=scales), params, grads_seq))
    for s in (1.0, 0.25):
        sched = wsd(0.01 * s, 6, 2, 3, "1-sqrt")
        ref = flat(run(optax.adamw(sched, 0.9, 0.95, 1e-8, weight_decay=0.5,
                                   mask=weight_decay_mask(specs)), params, grads_seq))
        for names in ref:
            if flat(scales)[names] == s:
                np.testing.assert_allclose(ours[names], ref[names], rtol=1e-6, atol=1e-7)
    # the scaled leaves really moved less
    moved = lambda n: np.abs(ours[n] - flat(params)[n]).mean()  # noqa: E731
    assert moved(("blocks", 0, "mlp", "w_up")) < 0.5 * moved(("blocks", 0, "attn", "wq"))


def test_lr_scales_must_match_params():
    _, specs = unrolled_tree()
    with pytest.raises(ValueError):
        build_optimizer(OptimConfig(), SCHED, 6, specs, lr_scales={"embed": {"embedding": 1.0}})


def test_lr_schedule_dispatch():
    steps = jnp.arange(100, dtype=jnp.int32)
    for cfg, ref in [
        (ScheduleConfig("wsd", 10, 20, "cosine", 0.1), wsd(0.5, 100, 10, 20, "cosine", 0.1)),
        (ScheduleConfig("cosine", 10, 20, "linear", 0.1), cosine(0.5, 100, 10, 0.1)),
    ]:
        got = jax.vmap(lr_schedule(cfg, 0.5, 100))(steps)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.vmap(ref)(steps)))


@pytest.mark.parametrize(
    "optim, sched, key",
    [
        (OptimConfig(name="sgd"), ScheduleConfig(), "optim.name"),
        (OptimConfig(name="muon", muon_scaling="spectral"), ScheduleConfig(), "optim.muon_scaling"),
        (OptimConfig(b2=1.0), ScheduleConfig(), "optim.b2"),
        (OptimConfig(eps=0.0), ScheduleConfig(), "optim.eps"),
        (OptimConfig(grad_clip=-1.0), ScheduleConfig(), "optim.grad_clip"),
        (OptimConfig(weight_decay=-0.1), ScheduleConfig(), "optim.weight_decay"),
        (OptimConfig(muon_momentum=1.0), ScheduleConfig(), "optim.muon_momentum"),
        (OptimConfig(muon_ns_steps=0), ScheduleConfig(), "optim.muon_ns_steps"),
        (OptimConfig(muon_lr_ratio=0.0), ScheduleConfig(), "optim.muon_lr_ratio"),
        (OptimConfig(), ScheduleConfig(name="linear"), "schedule.name"),
        (OptimConfig(), ScheduleConfig(warmup_steps=8, decay_steps=8), "train.steps"),
    ],
)
def test_config_mistakes_are_user_errors(optim, sched, key):
    """The optimizer's settings are checked once, where a config is read (load_config
    validates), with a message naming the key."""
    cfg = Config(train=TrainConfig(steps=10), optim=optim, schedule=sched)
    with pytest.raises(UserError, match=re.escape(key)):
        validate(cfg)


def test_muon_without_hidden_matrices_is_a_user_error():
    with pytest.raises(UserError, match="optim.name=adamw"):
        build_optimizer(OptimConfig(name="muon"), ScheduleConfig(), 10,
                        {"embed": ParamSpec(("vocab", "embed"), Role.EMBEDDING)})
