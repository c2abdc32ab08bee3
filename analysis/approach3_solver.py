"""The solver behind Approach 3: a summed Huber objective on log-loss residuals of
log L = LSE(a - alpha log N, b - beta log D, e), minimised from many starts at once.

A damped (Levenberg-Marquardt) Newton method with the exact 5x5 Hessian, run in float64 over
many starts at once in one `lax.while_loop`. Starts are fed through a fixed number of slots,
and a slot whose start has converged takes the next one, so a few slow starts do not hold up
all the others. Each start stops on convergence (no decrease left at float64 precision), never
on a fixed iteration count. The parameter vector is (a, b, e, alpha, beta) = (log A, log B,
log E, alpha, beta).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HUBER_DELTA = 1e-3  # Hoffmann et al.'s threshold


# ---------------------------------------------------------------------------------------------
# Objective, gradient and Hessian, batched over starts.


def fgh(theta_Px5, w_PxN, x_N, z_N, y_N, delta):
    """Summed Huber objective, its gradient and exact Hessian for P parameter vectors.

    Written out by hand: `jax.hessian` under vmap was several times slower here, and XLA
    recomputes the exponentials in every reduction unless the softmax weights are materialised
    once (the optimisation barrier).
    """
    a, b, e, alpha, beta = (theta_Px5[:, i : i + 1] for i in range(5))
    u1 = a - alpha * x_N
    u2 = b - beta * z_N
    u3 = jnp.broadcast_to(e, u1.shape)
    m = jnp.maximum(jnp.maximum(u1, u2), u3)
    e1, e2, e3 = jnp.exp(u1 - m), jnp.exp(u2 - m), jnp.exp(u3 - m)
    s = e1 + e2 + e3
    inv = 1.0 / s
    p1, p2, p3, r = lax.optimization_barrier((e1 * inv, e2 * inv, e3 * inv, m + jnp.log(s) - y_N))
    ar = jnp.abs(r)
    huber = jnp.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
    d = w_PxN * jnp.clip(r, -delta, delta)  # w * huber'(r)
    cd = w_PxN * (ar <= delta) - d  # w * (huber''(r) - huber'(r))
    d, cd = lax.optimization_barrier((d, cd))

    def tot(q):
        return jnp.sum(q, axis=1)

    f = tot(w_PxN * huber)
    # grad r = (p1, p2, p3, -x p1, -z p2); hess r = J^T diag(p) J - grad r grad r^T.
    dp1, dp2 = d * p1, d * p2
    s1, s1x, s1xx = tot(dp1), tot(dp1 * x_N), tot(dp1 * x_N * x_N)
    s2, s2z, s2zz = tot(dp2), tot(dp2 * z_N), tot(dp2 * z_N * z_N)
    s3 = tot(d * p3)
    c11, c12, c22 = cd * p1 * p1, cd * p1 * p2, cd * p2 * p2
    c13, c23, c33 = cd * p1 * p3, cd * p2 * p3, cd * p3 * p3
    g = jnp.stack([s1, s2, s3, -s1x, -s2z], axis=1)
    h00, h01, h02 = tot(c11) + s1, tot(c12), tot(c13)
    h03, h04 = -tot(c11 * x_N) - s1x, -tot(c12 * z_N)
    h11, h12 = tot(c22) + s2, tot(c23)
    h13, h14 = -tot(c12 * x_N), -tot(c22 * z_N) - s2z
    h22, h23, h24 = tot(c33) + s3, -tot(c13 * x_N), -tot(c23 * z_N)
    h33, h34 = tot(c11 * x_N * x_N) + s1xx, tot(c12 * x_N * z_N)
    h44 = tot(c22 * z_N * z_N) + s2zz
    rows = [
        [h00, h01, h02, h03, h04],
        [h01, h11, h12, h13, h14],
        [h02, h12, h22, h23, h24],
        [h03, h13, h23, h33, h34],
        [h04, h14, h24, h34, h44],
    ]
    H = jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)
    return f, g, H


def huber_objective(theta: np.ndarray, N, D, loss, delta: float = HUBER_DELTA) -> float:
    """The summed Huber objective at one (a, b, e, alpha, beta), in plain float64 numpy."""
    a, b, e, alpha, beta = np.asarray(theta, dtype=np.float64)
    x, z, y = np.log(N), np.log(D), np.log(loss)
    pred = np.logaddexp(np.logaddexp(a - alpha * x, b - beta * z), e)
    r = np.abs(pred - y)
    return float(np.sum(np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))))


# ---------------------------------------------------------------------------------------------
# The batched solver.

_LAM0 = 1e-3  # initial damping
_LAM_UP, _LAM_DOWN = 10.0, 0.3
_LAM_MIN, _LAM_MAX = 1e-12, 1e10  # beyond _LAM_MAX no step decreases f: stationary to precision
_FTOL = 1e-15  # stop when the model predicts less decrease than this, relative to f


def _lm_step(theta, f, g, H, lam, rejects, fresh, w, x_N, z_N, y_N, delta):
    """One damped Newton iteration for a batch of slots; a `fresh` slot just evaluates its start.

    Returns the updated (theta, f, g, H, lam, rejects) and whether each slot has converged.
    """
    eye = jnp.eye(5, dtype=theta.dtype)
    step = jnp.linalg.solve(H + lam[:, None, None] * eye, -g[..., None])[..., 0]
    step = jnp.where(fresh[:, None], 0.0, step)
    pred = -jnp.sum(g * step, 1) - 0.5 * jnp.einsum("pi,pij,pj->p", step, H, step)
    f1, g1, H1 = fgh(theta + step, w, x_N, z_N, y_N, delta)
    good = jnp.isfinite(f1) & jnp.all(jnp.isfinite(step), 1)
    ok = fresh | (good & (f1 < f))
    theta = jnp.where(ok[:, None], theta + step, theta)
    f = jnp.where(ok, f1, f)
    g = jnp.where(ok[:, None], g1, g)
    H = jnp.where(ok[:, None, None], H1, H)
    # Consecutive rejections raise the damping ever faster, so a converged start stalls out in
    # a few iterations rather than climbing 20 decades one at a time.
    rejects = jnp.where(ok, 0, rejects + 1)
    newton = lam <= 1e-6 * jnp.max(jnp.abs(jnp.diagonal(H, axis1=1, axis2=2)), 1)
    lam = jnp.where(ok, jnp.maximum(lam * _LAM_DOWN, _LAM_MIN), lam * _LAM_UP**rejects)
    lam = jnp.where(fresh, _LAM0, lam)
    # Converged: an accepted, nearly undamped Newton step predicts no decrease left at float64
    # precision, or even tiny gradient steps no longer decrease f.
    done = ~fresh & ((ok & newton & (pred <= _FTOL * f)) | (lam > _LAM_MAX))
    return (theta, f, g, H, lam, rejects), done


class _Slots(NamedTuple):
    """The Levenberg-Marquardt state of every slot (a pytree: one array per field)."""

    theta: jax.Array  # (slots, 5) parameters
    f: jax.Array  # objective
    g: jax.Array  # (slots, 5) gradient
    H: jax.Array  # (slots, 5, 5) Hessian
    lam: jax.Array  # damping
    rejects: jax.Array  # consecutive rejected steps


class _Queue(NamedTuple):
    """Which start each slot works on, and how far."""

    idx: jax.Array  # the start of each slot; `padded` marks an idle slot
    fresh: jax.Array  # the slot's start was just loaded: evaluate it, take no step
    it: jax.Array  # iterations spent on the slot's start
    next: jax.Array  # the first start not yet taken


class _Results(NamedTuple):
    """Per start (padded): where it ended, its objective, iterations and convergence."""

    theta: jax.Array
    f: jax.Array
    it: jax.Array
    conv: jax.Array


class _Problem(NamedTuple):
    """What every iteration reads: the starts, the points and their weights."""

    starts_Sx5: jax.Array
    n_starts: jax.Array
    sample_S: jax.Array
    weights_KxN: jax.Array
    x_N: jax.Array
    z_N: jax.Array
    y_N: jax.Array
    delta: jax.Array

    @property
    def padded(self) -> int:  # >= n_starts; also the index of an idle slot
        return self.starts_Sx5.shape[0]


def _step_slots(pb: _Problem, slots: _Slots, fresh, idx) -> tuple[_Slots, jax.Array]:
    """One LM iteration of the given slots, each on the point weights of its start."""
    w = pb.weights_KxN[pb.sample_S[jnp.minimum(idx, pb.padded - 1)]]
    parts, done = _lm_step(*slots, fresh, w, pb.x_N, pb.z_N, pb.y_N, pb.delta)
    return _Slots(*parts), done


def _step_few(pb: _Problem, slots: _Slots, queue: _Queue, few: int) -> tuple[_Slots, jax.Array]:
    """Iterate only the (at most `few`) busy slots: once the queue is empty, the slowest
    starts then cost a fraction of a full batch per iteration."""
    n_slots = queue.idx.shape[0]
    sel = jnp.nonzero(queue.idx < pb.n_starts, size=few, fill_value=n_slots)[0]
    take = jnp.minimum(sel, n_slots - 1)
    stepped, done = _step_slots(pb, jax.tree.map(lambda a: a[take], slots), queue.fresh[take],
                                queue.idx[take])
    slots = jax.tree.map(lambda a, v: a.at[sel].set(v, mode="drop"), slots, stepped)
    return slots, jnp.zeros(n_slots, bool).at[sel].set(done, mode="drop")


def _record(out: _Results, finished, slots: _Slots, queue: _Queue, it, done, padded: int):
    """Write the finished starts' results (out-of-range indices are dropped by the scatter)."""
    where = jnp.where(finished, queue.idx, padded)
    return _Results(*(a.at[where].set(v, mode="drop")
                      for a, v in zip(out, (slots.theta, slots.f, it, done), strict=True)))


def _refill(pb: _Problem, slots: _Slots, queue: _Queue, finished, it) -> tuple[_Slots, _Queue]:
    """Finished slots take the next starts in order; with none left they go idle."""
    rank = jnp.cumsum(finished, dtype=jnp.int32) - 1
    idx = jnp.where(finished, queue.next + rank, queue.idx)
    idx = jnp.where(finished & (idx >= pb.n_starts), pb.padded, idx)
    refill = finished & (idx < pb.n_starts)
    theta = jnp.where(refill[:, None], pb.starts_Sx5[jnp.minimum(idx, pb.padded - 1)],
                      slots.theta)
    slots = slots._replace(theta=theta, f=jnp.where(refill, jnp.inf, slots.f))
    queue = _Queue(idx=idx, fresh=refill, it=jnp.where(finished, 0, it),
                   next=queue.next + jnp.sum(finished, dtype=jnp.int32))
    return slots, queue


def _initial(pb: _Problem, n_slots: int) -> tuple[_Slots, _Queue, _Results]:
    """Slot i takes start i; the results start empty."""
    dtype, padded = pb.starts_Sx5.dtype, pb.padded
    first = jnp.where(jnp.arange(n_slots) < pb.n_starts, jnp.arange(n_slots), padded)
    slots = _Slots(
        theta=pb.starts_Sx5[jnp.minimum(first, padded - 1)],
        f=jnp.full(n_slots, jnp.inf, dtype),
        g=jnp.zeros((n_slots, 5), dtype),
        H=jnp.zeros((n_slots, 5, 5), dtype),
        lam=jnp.full(n_slots, _LAM0, dtype),
        rejects=jnp.zeros(n_slots, jnp.int32),
    )
    queue = _Queue(idx=first, fresh=first < pb.n_starts, it=jnp.zeros(n_slots, jnp.int32),
                   next=jnp.minimum(n_slots, pb.n_starts))
    results = _Results(theta=jnp.zeros((padded, 5), dtype), f=jnp.full(padded, jnp.inf, dtype),
                       it=jnp.zeros(padded, jnp.int32), conv=jnp.zeros(padded, bool))
    return slots, queue, results


@functools.partial(jax.jit, static_argnames=("slots",))
def _solve(starts_Sx5, n_starts, sample_S, weights_KxN, x_N, z_N, y_N, delta, max_iter, *, slots):
    """Minimise from the first `n_starts` rows of `starts_Sx5` (the rest is padding, so that
    similar sizes share one compiled program); start s uses the point weights
    `weights_KxN[sample_S[s]]`.

    Returns per start: parameters, objective, iterations used, and whether it converged.
    """
    pb = _Problem(starts_Sx5, n_starts, sample_S, weights_KxN, x_N, z_N, y_N, delta)
    few = max(1, slots // 16)

    def cond(carry):
        return jnp.any(carry[1].idx < n_starts)

    def body(carry):
        state, queue, out = carry
        active = queue.idx < n_starts
        state, done = lax.cond(
            jnp.sum(active) <= few,
            lambda: _step_few(pb, state, queue, few),
            lambda: _step_slots(pb, state, queue.fresh, queue.idx),
        )
        it = queue.it + 1
        finished = active & (done | (it >= max_iter))
        out = _record(out, finished, state, queue, it, done, pb.padded)
        state, queue = _refill(pb, state, queue, finished, it)
        return state, queue, out

    _, _, out = lax.while_loop(cond, body, _initial(pb, slots))
    return out.theta, out.f, out.it, out.conv


def minimise(
    starts: np.ndarray,
    N,
    D,
    loss,
    *,
    weights: np.ndarray | None = None,
    sample: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
    max_iter: int = 5000,
    slots: int = 512,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the solver from each row of `starts` (a, b, e, alpha, beta).

    `weights` (K x n) are per-point multiplicities (a bootstrap resample) and `sample[s]` says
    which row start s uses; by default every point counts once. Returns (theta, objective,
    iterations, converged), one entry per start.
    """
    starts = np.asarray(starts, dtype=np.float64).reshape(-1, 5)
    n_starts, n = len(starts), len(np.asarray(N))
    if weights is None:
        weights = np.ones((1, n))
    if sample is None:
        sample = np.zeros(n_starts, dtype=np.int32)
    # Pad the points to a multiple of 32 with zero weight (they add nothing to the objective),
    # so a data set that grows by a few runs, round after round, reuses the compiled program.
    n_pad = -(-n // 32) * 32 - n
    weights = np.concatenate([np.asarray(weights, dtype=np.float64),
                              np.zeros((len(weights), n_pad))], axis=1)
    N, D, loss = (np.concatenate([np.asarray(v, dtype=np.float64).ravel(), np.ones(n_pad)])
                  for v in (N, D, loss))
    # Pad the starts to a multiple of the slots: one compiled program serves many sizes.
    padded = -(-n_starts // slots) * slots
    starts = np.concatenate([starts, np.zeros((padded - n_starts, 5))])
    sample = np.concatenate(
        [np.asarray(sample, dtype=np.int32), np.zeros(padded - n_starts, np.int32)]
    )
    with jax.enable_x64(True):
        out = _solve(
            jnp.asarray(starts),
            jnp.asarray(n_starts, dtype=jnp.int32),
            jnp.asarray(sample),
            jnp.asarray(weights, dtype=jnp.float64),
            jnp.log(jnp.asarray(N, dtype=jnp.float64)),
            jnp.log(jnp.asarray(D, dtype=jnp.float64)),
            jnp.log(jnp.asarray(loss, dtype=jnp.float64)),
            jnp.asarray(delta, dtype=jnp.float64),
            jnp.asarray(max_iter, dtype=jnp.int32),
            slots=slots,
        )
        return tuple(np.asarray(o)[:n_starts] for o in out)  # type: ignore[return-value]
