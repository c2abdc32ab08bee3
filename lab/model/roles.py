"""A parameter's role and logical axes, declared once where the parameter is created.

Every parameter of the model is made with `param(value, axes, role)`: an nnx.Param carrying its
logical axis names (one per dimension, mapped to mesh axes by lab.accel.sharding.RULES) and its
`Role`. Everything else that treats parameters differently reads these two facts from the
tree `specs_of` returns, never from a parameter's name:

    lab.accel.sharding     axes  -> the parameter's sharding (and its optimizer moments')
    lab.optim.optimizers        role  -> Muon or AdamW, weight decay or not
    lab.model.transformer        role  -> μP's learning-rate multiplier
    lab.model.moe          role  -> the router biases the train step balances itself

So a new kind of weight (an MoE expert matrix, a bias) is one `param(...)` call in the module
that creates it. Layers stacked for `jax.lax.scan` gain a leading "layers" axis (`stack`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

LAYERS = "layers"  # the logical axis of a stack of layers


class Role(enum.Enum):
    """What a parameter is to the optimizer."""

    HIDDEN = "hidden"  # a hidden weight matrix: Muon's group, μP's width-scaled learning rate
    EMBEDDING = "embedding"  # the input embedding: AdamW, decayed
    HEAD = "head"  # the output head: AdamW, decayed
    NORM = "norm"  # a norm scale or a bias: AdamW, never decayed
    # Moved outside the gradient, never by the optimizer: the MoE router's balancing bias
    # (lab.model.moe.balance_biases)
    BALANCE = "balance"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter's declaration: logical axes (one per dimension) and role."""

    axes: tuple[str, ...]
    role: Role


def param(value: Any, axes: Sequence[str], role: Role) -> nnx.Param:
    """An nnx.Param of `value` (an array or a ShapeDtypeStruct) declaring its axes and role."""
    axes = tuple(axes)
    if len(axes) != len(value.shape):
        raise ValueError(f"{len(axes)} axes {axes} for a parameter of shape {value.shape}")
    if role is Role.HIDDEN and len(axes) < 2:
        raise ValueError(f"a hidden matrix needs at least 2 axes, got {axes}")
    return nnx.Param(value, axes=axes, role=role)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _spec(variable: nnx.Variable) -> ParamSpec:
    axes, role = variable.get_metadata("axes", None), variable.get_metadata("role", None)
    if axes is None or not isinstance(role, Role):
        raise ValueError(f"a parameter of shape {variable.shape} declares no axes and role; "
                         "create it with lab.model.roles.param")
    return ParamSpec(axes, role)


def specs_of(params: Any) -> Any:
    """The ParamSpec of every parameter in a tree of nnx.Params (an nnx.State, e.g. of an
    abstract model, or nested dicts), as nested dicts like `nnx.to_pure_dict` gives."""
    if isinstance(params, nnx.State):
        return nnx.to_pure_dict(params, extract_fn=_spec)
    return jax.tree.map(_spec, params, is_leaf=_is_variable)


def stack(states: Sequence[nnx.State], stack_fn) -> nnx.State:
    """Per-layer states stacked leaf by leaf with `stack_fn` (e.g. jnp.stack), each parameter
    declaring the new leading "layers" axis."""
    def one(*variables: nnx.Variable) -> nnx.Variable:
        first = variables[0]
        stacked = first.replace(stack_fn([v.get_value() for v in variables]))
        if first.get_metadata("axes", None) is not None:
            stacked.set_metadata(axes=(LAYERS, *first.get_metadata("axes")))
        return stacked

    return jax.tree.map(one, *states, is_leaf=_is_variable)
