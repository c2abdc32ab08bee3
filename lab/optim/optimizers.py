"""The optimizer from the config: schedule, gradient clipping, AdamW and Muon groups, μP scales.

    clip_by_global_norm(optim.grad_clip)            (left out when grad_clip = 0)
    multi_transform({"adamw": adamw, "muon": muon}, param_labels)
    per-parameter learning-rate scales              (left out when there are none)

Routing is by the role each parameter declares where it is created (lab.model.roles), never by its
name or rank: hidden matrices go to Muon; the embedding, the output head, every norm scale and
any bias go to AdamW, for unrolled layers and scanned ones alike (whose stacked norm scales
(L, D) are 2-D but still go to AdamW). Weight decay skips norm scales and biases in both groups.
A parameter moved outside the gradient (Role.BALANCE: the MoE router's balancing bias, which
the train step moves itself) is in a group "none" whose update is zero.

The roles come as a tree of lab.model.roles.ParamSpec (nested dicts,
`lab.model.transformer.param_specs`); the
parameters, gradients and updates may be nested dicts, `nnx.State`s or `nnx.State`s of
Variables: each leaf finds its spec by the names along its path (lab.tree.align).
"""

import math
from collections import Counter

import jax
import jax.numpy as jnp
import optax

from lab.config import SCHEDULES
from lab.errors import UserError
from lab.model.roles import ParamSpec, Role
from lab.optim.muon import muon
from lab.optim.schedules import cosine, wsd
from lab.tree import align, path_names


def group(spec: ParamSpec) -> str:
    """The optimizer a parameter goes to: "muon" for hidden matrices, "none" for what is moved
    outside the gradient (Role.BALANCE), else "adamw"."""
    if spec.role is Role.BALANCE:
        return "none"
    return "muon" if spec.role is Role.HIDDEN else "adamw"


def decays(spec: ParamSpec) -> bool:
    """Whether weight decay applies: to matrices, never to norm scales or biases."""
    return spec.role not in (Role.NORM, Role.BALANCE)


def param_labels(specs):
    """"muon" or "adamw" for every parameter, in a tree like `specs`."""
    return jax.tree.map(group, specs)


def weight_decay_mask(specs):
    """True where weight decay applies, in a tree like `specs`."""
    return jax.tree.map(decays, specs)


def describe_routing(params, specs) -> str:
    """A short table of the routing: one row per parameter name, layer indices folded into '*'."""
    rows: Counter = Counter()
    flat_specs = jax.tree.leaves(align(specs, params))
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0], flat_specs,
                                  strict=True):
        names = path_names(path)
        folded = "/".join("*" if isinstance(n, int) else str(n) for n in names)
        shape = tuple(getattr(leaf, "shape", ()))
        rows[(folded, shape, group(spec), decays(spec))] += 1
    width = max([len(r[0]) for r in rows] + [9])
    lines = [f"{'parameter':<{width}}  {'shape':<18} {'count':>5}  group  weight decay"]
    for (name, shape, group_, decay), count in rows.items():
        lines.append(
            f"{name:<{width}}  {str(shape):<18} {count:>5}  {group_:<5}  {'yes' if decay else 'no'}"
        )
    return "\n".join(lines)


def map_param_copies(fn, opt_state, params, *rest, other):
    """The optimizer state with `fn(leaf, param, *rest_leaves)` on every leaf of a copy of
    the parameters' tree in it (optax keeps moments as such copies, leaves outside a
    multi_transform group masked by optax.MaskedNode) and `other(leaf)` on every other leaf
    (step counts). `params` and each of `rest` are trees like the parameters."""
    def masked(x) -> bool:
        return isinstance(x, optax.MaskedNode)

    structure = jax.tree.structure(params)

    def is_copy(node) -> bool:
        return jax.tree.structure(node, is_leaf=masked) == structure

    def one(node):
        if not is_copy(node):
            return other(node)
        return jax.tree.map(lambda leaf, *xs: leaf if masked(leaf) else fn(leaf, *xs),
                            node, params, *rest, is_leaf=masked)

    return jax.tree.map(one, opt_state, is_leaf=is_copy)


def lr_schedule(schedule_cfg, peak_lr: float, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule named by `schedule.name` (cosine ignores the decay keys)."""
    name = schedule_cfg.name
    if name == "wsd":
        return wsd(
            peak_lr,
            total_steps,
            schedule_cfg.warmup_steps,
            schedule_cfg.decay_steps,
            schedule_cfg.decay_shape,
            schedule_cfg.final_ratio,
        )
    if name == "cosine":
        return cosine(peak_lr, total_steps, schedule_cfg.warmup_steps, schedule_cfg.final_ratio)
    raise ValueError(f"unknown schedule {name!r}, not one of {SCHEDULES}")  # config validates


def scale_by_lr_scales(lr_scales, specs) -> optax.GradientTransformation | None:
    """Multiply each leaf's final update by its scale (None when every scale is 1).

    Scales are looked up by path names, so the tree may be a dict while updates are a State.
    """
    leaves = jax.tree_util.tree_flatten_with_path(lr_scales)[0]
    scales = {path_names(path): float(s) for path, s in leaves}
    wanted = {path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(specs)[0]}
    if set(scales) != wanted:
        missing = sorted(map(str, wanted - set(scales)))[:3]
        extra = sorted(map(str, set(scales) - wanted))[:3]
        raise ValueError(f"lr_scales must match the params' tree: missing {missing}, extra {extra}")
    if all(math.isclose(s, 1.0) for s in scales.values()):
        return None

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates,
                            align(lr_scales, updates)), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def newton_schulz_dtype(ns_dtype: str, platform: str | None = None) -> jnp.dtype:
    """optim.muon_ns_dtype's operand dtype on a platform (cpu | gpu | tpu; None = this host's
    default backend): auto is bfloat16 on accelerators, where float32 products cost Muon its
    speed, and float32 on CPUs, where bfloat16 buys nothing."""
    if ns_dtype == "auto":
        on_cpu = (platform or jax.default_backend()) == "cpu"
        ns_dtype = "float32" if on_cpu else "bfloat16"
    return jnp.dtype(ns_dtype)


def build_optimizer(
    optim_cfg, schedule_cfg, total_steps: int, specs, lr_scales=None,
    platform: str | None = None,
) -> optax.GradientTransformation:
    """The whole optimizer for parameters with these ParamSpecs (lab.model.roles; a tree like them).
    The settings are those of a validated config (lab.config.validate checks them).

    AdamW is ``optax.adamw`` on the schedule with decoupled weight decay masked to matrices.
    ``platform`` (cpu | gpu | tpu; None = this host's) resolves ``optim.muon_ns_dtype=auto``.
    Muon runs on the schedule times ``optim.muon_lr_ratio`` with the same weight decay.
    ``lr_scales`` (a tree like `specs` of floats, e.g. μP's) multiplies each parameter's whole
    final update, weight-decay term included: every parameter then moves exactly as it would
    under the same optimizer with learning rate ``scale * lr``, decay ``scale * lr * wd * W``,
    which is how decay follows the learning rate in ``optax.adamw`` and in PyTorch parameter
    groups (the `mup` package's MuAdamW). The decay timescale 1 / (lr * wd) therefore scales with
    the parameter's learning rate; to hold it fixed instead, divide that group's decay by scale.
    """
    schedule = lr_schedule(schedule_cfg, optim_cfg.lr, total_steps)
    labels, decay = param_labels(specs), weight_decay_mask(specs)
    adamw = optax.adamw(
        schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda params: align(decay, params),
    )
    groups = set(jax.tree.leaves(labels))
    if optim_cfg.name == "adamw":
        core = adamw
        if "none" in groups:  # every other parameter to AdamW, hidden matrices too
            trained = jax.tree.map(lambda g: "none" if g == "none" else "adamw", labels)
            core = optax.multi_transform({"adamw": adamw, "none": optax.set_to_zero()},
                                         lambda params: align(trained, params))
    else:
        if "muon" not in groups:
            raise UserError(
                "optim.name=muon, but no parameter is a hidden matrix "
                "(lab.model.roles.Role.HIDDEN); "
                "use optim.name=adamw"
            )
        ratio = optim_cfg.muon_lr_ratio
        hidden = muon(
            lambda step: schedule(step) * ratio,
            momentum=optim_cfg.muon_momentum,
            nesterov=optim_cfg.muon_nesterov,
            ns_steps=optim_cfg.muon_ns_steps,
            compute_dtype=newton_schulz_dtype(optim_cfg.muon_ns_dtype, platform),
            scaling=optim_cfg.muon_scaling,
            weight_decay=optim_cfg.weight_decay,
        )
        transforms = {"adamw": adamw, "muon": hidden}
        if "none" in groups:
            transforms["none"] = optax.set_to_zero()
        core = optax.multi_transform(transforms, lambda params: align(labels, params))
    parts = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    parts.append(core)
    if lr_scales is not None:
        scaler = scale_by_lr_scales(lr_scales, specs)
        if scaler is not None:
            parts.append(scaler)
    return optax.chain(*parts)
