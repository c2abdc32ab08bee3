"""Parameter roles declared once: a new kind of weight, declared in this file only (a low-rank
adapter in every block: two hidden matrices and a bias), is sharded on 8 devices, routed to Muon
or AdamW, decayed or not and given its μP learning-rate scale, all from its declaration."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lab.accel.sharding import make_mesh, param_shardings
from lab.config import load_config
from lab.model import transformer as lab_model
from lab.model.roles import LAYERS, ParamSpec, Role, param, specs_of
from lab.optim.optimizers import describe_routing, param_labels, weight_decay_mask
from lab.train import build_trainer
from lab.tree import path_names

ROOT = Path(__file__).resolve().parents[1]
RANK = 8  # the adapter's inner width
MUON_RATIO, MUP_RATIO, WD = 0.25, 0.5, 0.1  # MUP_RATIO = mup_base_width 16 / d_model 32


class AdapterBlock(lab_model.Block):
    """The model's block plus x + silu(x A + b) B: the only place the new weights appear."""

    def __init__(self, cfg, kernels, rngs):
        super().__init__(cfg, kernels, rngs)
        init = jax.nn.initializers.normal(0.02)
        D = cfg.d_model
        self.adapter_in = param(init(rngs.params(), (D, RANK)), ("embed", "mlp"), Role.HIDDEN)
        self.adapter_bias = param(init(rngs.params(), (RANK,)), ("mlp",), Role.NORM)
        self.adapter_out = param(init(rngs.params(), (RANK, D)), ("mlp", "embed"), Role.HIDDEN)

    def __call__(self, x, sin, cos):
        x, stats = super().__call__(x, sin, cos)
        h = x @ self.adapter_in[...].astype(x.dtype) + self.adapter_bias[...].astype(x.dtype)
        return x + jax.nn.silu(h) @ self.adapter_out[...].astype(x.dtype), stats


@pytest.fixture
def adapter_model(monkeypatch):
    """Transformer builds AdapterBlocks while a test runs."""
    monkeypatch.setattr(lab_model, "Block", AdapterBlock)


def config(*overrides: str):
    return load_config(ROOT / "configs/tiny.yaml", [
        "model.d_model=32", "model.n_heads=4", "model.n_layers=2", "model.vocab_size=64",
        "model.parameterization=mup", "model.mup_base_width=16", "optim.name=muon",
        f"optim.muon_lr_ratio={MUON_RATIO}", f"optim.weight_decay={WD}", "optim.grad_clip=0",
        "schedule.warmup_steps=0", "schedule.decay_steps=0", "train.steps=10",
        "train.batch_size=8", "mesh.fsdp=4", "mesh.tensor=2", *overrides])


@pytest.mark.parametrize("scan", [True, False])
def test_the_declaration_is_the_spec(adapter_model, scan):
    specs = lab_model.param_specs(config(f"model.scan_layers={scan}").model)
    block = specs["blocks"] if scan else specs["blocks"][1]
    lead = (LAYERS,) if scan else ()  # stacked layers add their axis
    assert block["adapter_in"] == ParamSpec((*lead, "embed", "mlp"), Role.HIDDEN)
    assert block["adapter_bias"] == ParamSpec((*lead, "mlp"), Role.NORM)
    assert block["adapter_out"] == ParamSpec((*lead, "mlp", "embed"), Role.HIDDEN)
    labels, decay = param_labels(specs), weight_decay_mask(specs)
    labels = labels["blocks"] if scan else labels["blocks"][1]
    decay = decay["blocks"] if scan else decay["blocks"][1]
    assert (labels["adapter_in"], labels["adapter_bias"]) == ("muon", "adamw")
    assert (decay["adapter_in"], decay["adapter_bias"]) == (True, False)
    scales = lab_model.mup_lr_scales(config().model, specs)
    scales = scales["blocks"] if scan else scales["blocks"][1]
    assert (scales["adapter_in"], scales["adapter_bias"]) == (MUP_RATIO, 1.0)


def test_a_new_weight_is_sharded_routed_decayed_and_scaled(adapter_model):
    cfg = config()
    mesh = make_mesh(cfg.mesh)
    assert mesh.devices.size == 8
    trainer = build_trainer(cfg, mesh)
    state = trainer.init_state()
    params = state["params"]["blocks"]

    # Sharded: the parameters as their axes say (layers, then embed -> fsdp, mlp -> tensor) ...
    want = {"adapter_in": P(None, "fsdp", "tensor"), "adapter_bias": P(None, "tensor"),
            "adapter_out": P(None, "tensor", "fsdp")}
    for name, spec in want.items():
        assert params[name].sharding.is_equivalent_to(NamedSharding(mesh, spec), 3), name
    # ... and their optimizer moments alike: one (Muon's momentum) for a hidden matrix, two
    # (Adam's mu and nu) for the bias, each in its own group.
    moments: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt"])[0]:
        names = path_names(path)
        if names[-2:-1] == ("blocks",) and names[-1] in want:
            group = "muon" if "muon" in names else "adamw"
            moments.setdefault(names[-1], []).append(group)
            assert leaf.sharding.is_equivalent_to(params[names[-1]].sharding, leaf.ndim), names
    assert moments == {"adapter_in": ["muon"], "adapter_bias": ["adamw", "adamw"],
                       "adapter_out": ["muon"]}

    # Routed, decayed and scaled: with zero gradients both optimizers' own steps vanish (Adam's
    # m / (sqrt(v) + eps) = 0, Newton-Schulz of 0 is 0) and what remains is the weight decay,
    # -lr * muon_lr_ratio (Muon only) * μP scale (hidden matrices only) * wd * W, or nothing.
    values = jax.device_get(state["params"])
    zeros = jax.tree.map(np.zeros_like, values)
    updates, _ = jax.jit(trainer.tx.update)(zeros, jax.device_get(state["opt"]), values)
    lr = float(trainer.schedule(0))
    assert lr > 0
    factor = {"adapter_in": MUON_RATIO * MUP_RATIO, "adapter_out": MUON_RATIO * MUP_RATIO,
              "adapter_bias": 0.0}
    for name, f in factor.items():
        w = values["blocks"][name]
        np.testing.assert_allclose(np.asarray(updates["blocks"][name]), -lr * f * WD * w,
                                   rtol=1e-5, atol=1e-12, err_msg=name)
        assert f == 0.0 or np.abs(w).min() > 0  # the check could fail: nothing is zero
    # The model's own kinds, for reference: the embedding is AdamW's, decayed at scale 1.
    np.testing.assert_allclose(np.asarray(updates["embed"]["embedding"]),
                               -lr * WD * values["embed"]["embedding"], rtol=1e-5)

    rows = {r.split()[0]: r.split()[-3:] for r in describe_routing(
        trainer.abstract_params, trainer.param_specs).splitlines()[1:]}
    assert rows["blocks/adapter_in"] == ["1", "muon", "yes"]
    assert rows["blocks/adapter_bias"] == ["1", "adamw", "no"]


def test_declaration_mistakes_are_named():
    with pytest.raises(ValueError, match="2 axes"):
        param(jnp.ones((4,)), ("embed", "mlp"), Role.HIDDEN)
    with pytest.raises(ValueError, match="at least 2 axes"):
        param(jnp.ones((4,)), ("mlp",), Role.HIDDEN)
    with pytest.raises(ValueError, match="lab.model.roles.param"):
        specs_of({"w": nnx.Param(jnp.ones((4, 4)))})
    # A logical axis needs a rule: never silently replicated.
    tree = {"w": param(jnp.ones((8, 4, 4)), ("experts", "embed", "mlp"), Role.HIDDEN)}
    with pytest.raises(ValueError, match="'experts'.*RULES"):
        param_shardings({"w": jnp.ones((8, 4, 4))}, specs_of(tree),
                        make_mesh(config().mesh))
