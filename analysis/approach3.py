"""Approach 3 of Hoffmann et al. (2022): the parametric law L(N, D) = E + A/N^alpha + B/D^beta.

Fitted as their Appendix D.2 describes: with (a, b, e) = log(A, B, E),
log L = LSE(a - alpha log N, b - beta log D, e), a Huber loss (delta = 1e-3) on the log-loss
residuals, summed, minimised from every point of the published grid of initialisations
(4,500 starts), best kept.

The solver is ours: a damped (Levenberg-Marquardt) Newton method with the exact 5x5 Hessian,
run in float64 over many starts at once in one `lax.while_loop`. Starts are fed through a fixed
number of slots, and a slot whose start has converged takes the next one, so a few slow starts
do not hold up all the others. Each start stops on convergence (no decrease left at float64
precision), never on a fixed iteration count.

Each start is first minimised with a wider Huber threshold (delta = 0.1: nearly least squares,
smooth, so Newton steps work from far away) and then, from where that converged, with the
published delta = 1e-3. Both stages run to convergence; the objective, the grid and the optimum
kept are the published ones, and this continuation takes 1.3x (Chinchilla data) to 3.5x
(synthetic laws) fewer iterations than starting at delta = 1e-3.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import lax

from analysis.points import check_points
from lab.errors import UserError

PARAMS = ("a", "b", "e", "alpha", "beta")  # the order of the solver's parameter vector
NAMES = ("E", "A", "B", "alpha", "beta")  # the order of reported values and bootstrap samples
HUBER_DELTA = 1e-3
CONTINUATION = (1e-1,)  # Huber thresholds solved first, each from the previous one's optimum


def chinchilla_grid() -> np.ndarray:
    """The 4,500 starts of Hoffmann et al. Appendix D.2, as rows (a, b, e, alpha, beta)."""
    a = np.arange(0.0, 30.0, 5.0)  # {0, 5, ..., 25}
    e = np.arange(-1.0, 1.5, 0.5)  # {-1, -0.5, ..., 1}
    ab = np.arange(0.0, 2.5, 0.5)  # {0, 0.5, ..., 2}
    return np.array(list(itertools.product(a, a, e, ab, ab)), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Objective, gradient and Hessian, batched over starts.


def _fgh(theta_Px5, w_PxN, x_N, z_N, y_N, delta):
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
    f1, g1, H1 = _fgh(theta + step, w, x_N, z_N, y_N, delta)
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


# ---------------------------------------------------------------------------------------------
# The fit and what it implies.


@dataclass
class Approach3Fit:
    """A fitted L(N, D) = E + A/N^alpha + B/D^beta, with diagnostics and optional intervals."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss at the optimum
    n_points: int
    n_starts: int
    n_converged: int
    max_iterations: int = 0  # the most iterations any start needed (both stages)
    warnings: list[str] = field(default_factory=list)
    # Distinct local optima (rows a, b, e, alpha, beta), best first; bootstrap refits start there.
    optima: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)), repr=False)
    # Bootstrap: parameter samples (K x 5, in NAMES order) and percentile intervals.
    samples: np.ndarray | None = field(default=None, repr=False)
    level: float = 0.95
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def theta(self) -> np.ndarray:
        """The solver's parameters (a, b, e, alpha, beta)."""
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

    @property
    def degenerate(self) -> bool:
        """An optimum no law could mean: a non-finite parameter, an exponent at zero or beyond
        the grid of starts, or a coefficient beyond e^50 (e.g. A = 9.7e116)."""
        values = (self.E, self.A, self.B, self.alpha, self.beta)
        if not all(np.isfinite(v) for v in values):
            return True
        return not (0.01 <= self.alpha <= 2.0 and 0.01 <= self.beta <= 2.0) or max(
            abs(np.log(self.A)), abs(np.log(self.B))) > 50

    def describe(self) -> str:
        """The law as text, or "degenerate fit" when its numbers mean nothing."""
        if self.degenerate:
            return "degenerate fit (see its warnings)"
        return (f"L(N, D) = {self.E:.3g} + {self.A:.3g}/N^{self.alpha:.3f} + "
                f"{self.B:.3g}/D^{self.beta:.3f}")

    @property
    def a(self) -> float:
        """Allocation exponent of N: N_opt is proportional to C^a, a = beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Allocation exponent of D: D_opt is proportional to C^b, b = alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)); N_opt = G (C/6)^a."""
        return _G(self.A, self.B, self.alpha, self.beta)

    def predict(self, N, D) -> np.ndarray:
        """Predicted loss at N parameters and D tokens."""
        return law(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    def compute_optimal(self, C) -> pd.DataFrame:
        """N_opt, D_opt and the predicted loss for each budget C (FLOPs), with intervals when
        bootstrapped (columns *_lo, *_hi)."""
        return compute_optimal(self, C)

    def to_dict(self) -> dict:
        """The JSON form: E, A, B, alpha, beta, a, b, n_points, and the rest."""
        out = {
            "method": "approach3",
            "E": self.E,
            "A": self.A,
            "B": self.B,
            "alpha": self.alpha,
            "beta": self.beta,
            "a": self.a,
            "b": self.b,
            "G": self.G,
            "n_points": self.n_points,
            "objective": self.objective,
            "huber_delta": HUBER_DELTA,
            "n_starts": self.n_starts,
            "n_converged": self.n_converged,
            "max_iterations": self.max_iterations,
            "warnings": list(self.warnings),
            "degenerate": self.degenerate,
        }
        if self.samples is not None:
            out["bootstrap_samples"] = len(self.samples)
            out["level"] = self.level
            out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return out


def law(N, D, E, A, B, alpha, beta) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
    return E + A / N**alpha + B / D**beta


def _G(A, B, alpha, beta):
    return (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))


def optimal_allocation(C, E, A, B, alpha, beta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The minimiser of L(N, D) subject to 6 N D = C: (N_opt, D_opt, loss).

    Setting the derivative along N D = C/6 to zero gives alpha A / N^alpha = beta B / D^beta,
    hence N_opt = G (C/6)^(beta/(alpha+beta)) and D_opt = (C/6) / N_opt (Hoffmann et al. eq. 4).
    """
    C = np.asarray(C, dtype=np.float64)
    G = _G(A, B, alpha, beta)
    N = G * (C / 6.0) ** (beta / (alpha + beta))
    D = (C / 6.0) / N
    return N, D, law(N, D, E, A, B, alpha, beta)


def compute_optimal(fit: Approach3Fit, C) -> pd.DataFrame:
    """Compute-optimal N, D and loss at budgets C, with bootstrap intervals when available."""
    C = np.atleast_1d(np.asarray(C, dtype=np.float64))
    if (C <= 0).any() or not np.isfinite(C).all():
        raise UserError("compute budgets must be positive FLOP counts, e.g. 1e21")
    N, D, L = optimal_allocation(C, fit.E, fit.A, fit.B, fit.alpha, fit.beta)
    out = pd.DataFrame({"C": C, "N_opt": N, "D_opt": D, "loss": L})
    if fit.samples is not None:
        q = [(1 - fit.level) / 2, (1 + fit.level) / 2]
        s = fit.samples  # K x 5: E, A, B, alpha, beta
        Ns, Ds, Ls = optimal_allocation(C[None, :], *(s[:, i : i + 1] for i in range(5)))
        for name, arr in (("N_opt", Ns), ("D_opt", Ds), ("loss", Ls)):
            lo, hi = np.nanquantile(arr, q, axis=0)
            out[name + "_lo"], out[name + "_hi"] = lo, hi
    return out


def _diagnose(theta, f, it, conv, best, x, z, y, max_iter) -> list[str]:
    """Warnings about a fit that ended at an edge or is poorly identified."""
    warns = []
    a, b, e, alpha, beta = theta[best]
    if not conv[best]:
        warns.append(
            f"the best start did not converge in {max_iter} iterations; treat the fit as rough"
        )
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value < 0.01:
            warns.append(f"{name}={value:.3g} is at zero: the data do not show that term falling")
        elif value > 2.0:
            warns.append(f"{name}={value:.3g} is beyond the grid of starts (0 to 2)")
    for name, value, lo, hi in (("log A", a, 0, 25), ("log B", b, 0, 25), ("log E", e, -1, 1)):
        if not lo <= value <= hi:
            warns.append(f"{name}={value:.3g} is outside the grid of starts ({lo} to {hi})")
    # Starts that reach (nearly) the same objective should agree on the exponents.
    near = conv & (f <= f[best] * 1.01)
    spread = np.ptp(theta[near][:, 3:], axis=0) if near.any() else np.zeros(2)
    if spread.max() > 0.01:
        warns.append(
            f"starts within 1% of the best objective disagree (alpha spans {spread[0]:.3g}, "
            f"beta {spread[1]:.3g}): the optimum is poorly identified"
        )
    with jax.enable_x64(True):
        _, _, H = _fgh(
            jnp.asarray(theta[best : best + 1]), jnp.ones((1, len(x))), x, z, y, HUBER_DELTA
        )
    H = np.asarray(H[0])
    scale = np.sqrt(np.abs(np.diag(H)))
    if (scale == 0).any():
        cond = np.inf
    else:
        ev = np.linalg.eigvalsh(H / np.outer(scale, scale))
        cond = np.inf if ev[0] <= 0 else ev[-1] / ev[0]
    if cond > 1e8:
        warns.append(
            f"the Hessian at the optimum is near-singular (scaled condition number {cond:.2g}): "
            "the data do not pin down all five parameters"
        )
    return warns


COLLINEAR = 1e-3  # below this, log N and log D are one variable: the law cannot be fitted
NEARLY_COLLINEAR = 0.05  # below this, say loudly that N and D are hard to separate


def check_design(N: np.ndarray, D: np.ndarray) -> list[str]:
    """Refuse a design Approach 3 cannot fit; return warnings about a weak one.

    The law needs N and D to vary independently: with a single N (or D) one of its terms is a
    constant absorbed by E, and with log D an affine function of log N (D = 20 N at every size)
    the two terms cannot be told apart. The second is measured by the smaller singular value of
    the standardised (log N, log D) cloud, relative to the larger.
    """
    for name, v in (("N", N), ("D", D)):
        distinct = len(np.unique(v))
        if distinct < 2:
            raise UserError(
                f"Approach 3 needs at least 2 distinct {name} values and got {distinct}: "
                f"L(N, D) cannot be fitted; add runs at other {name}"
            )
    xz = np.stack([np.log(N), np.log(D)], axis=1)
    xz = (xz - xz.mean(0)) / xz.std(0)
    sv = np.linalg.svd(xz, compute_uv=False)
    ratio = sv[-1] / sv[0]
    if ratio < COLLINEAR:
        slope = np.polyfit(np.log(N), np.log(D), 1)[0]
        raise UserError(
            f"Approach 3 cannot separate N from D: log D is an affine function of log N in "
            f"every point (D ∝ N^{slope:.3g}), so A/N^alpha and B/D^beta are one term; add runs "
            "with other tokens per parameter at the same N"
        )
    if ratio < NEARLY_COLLINEAR:
        return [f"N and D are nearly collinear (singular value ratio {ratio:.2g}): the fit "
                "cannot tell their terms apart well; add other tokens per parameter"]
    return []


def _distinct_optima(theta, f, conv, limit=4, within=1.5) -> np.ndarray:
    """Distinct converged optima whose objective is within `within` times the best, best first."""
    rows = []
    for j in np.argsort(f):
        if not conv[j] or f[j] > within * f[np.argmin(f)]:
            continue
        if all(np.max(np.abs(theta[j] - r)) > 1e-3 for r in rows):
            rows.append(theta[j])
        if len(rows) == limit:
            break
    return np.array(rows).reshape(-1, 5)


def fit_approach3(
    N,
    D,
    loss,
    *,
    grid: np.ndarray | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
    max_iter: int = 5000,
) -> Approach3Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. Appendix D.2 describe.

    Every start of `grid` (default: the published 4,500) is minimised to convergence and the
    best is kept. With `bootstrap` > 0, that many resamples of the points are refitted (seeded
    by `seed`) and percentile intervals at `level` are attached.
    """
    df = pd.DataFrame({"N": np.ravel(N), "D": np.ravel(D), "loss": np.ravel(loss)})
    check_points(df, ("N", "D", "loss"), min_points=len(PARAMS), what="Approach 3 (5 parameters)")
    starts = chinchilla_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    N, D, loss = (df[c].to_numpy(np.float64) for c in ("N", "D", "loss"))
    design_warnings = check_design(N, D)
    theta, iters = starts, 0
    for delta in (*CONTINUATION, HUBER_DELTA):
        theta, f, it, conv = minimise(theta, N, D, loss, delta=delta, max_iter=max_iter)
        iters = iters + it
    f = np.where(np.isfinite(f), f, np.inf)
    best = int(np.argmin(f))
    if not np.isfinite(f[best]):
        raise UserError("Approach 3 found no finite fit from any start; check N, D and loss")
    a, b, e, alpha, beta = theta[best]
    warns = design_warnings + _diagnose(
        theta, f, it, conv, best, np.log(N), np.log(D), np.log(loss), max_iter
    )
    fit = Approach3Fit(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=float(alpha),
        beta=float(beta),
        objective=float(f[best]),
        n_points=len(N),
        n_starts=len(starts),
        n_converged=int(conv.sum()),
        max_iterations=int(iters.max()),
        warnings=warns,
        optima=_distinct_optima(theta, f, conv),
    )
    if bootstrap:
        fit = bootstrap_approach3(fit, N, D, loss, n_samples=bootstrap, seed=seed, level=level)
    return fit


def bootstrap_approach3(
    fit: Approach3Fit,
    N,
    D,
    loss,
    *,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    max_iter: int = 5000,
) -> Approach3Fit:
    """Refit on `n_samples` resamples (with replacement) of the points; attach the samples and
    percentile intervals of E, A, B, alpha, beta, a, b and G.

    Each resample is refitted from the fit's distinct optima (the best one first), as Besiroglu
    et al. (2024) refit theirs from a single good start; all resamples run in one batch, with
    resampling expressed as per-point multiplicities.
    """
    if n_samples < 2:
        raise UserError(f"--bootstrap needs at least 2 samples, got {n_samples}")
    if not 0 < level < 1:
        raise UserError(f"the interval level must be between 0 and 1, got {level}")
    N, D, loss = (np.asarray(v, dtype=np.float64).ravel() for v in (N, D, loss))
    n = len(N)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_samples, n))
    weights = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
    starts0 = fit.optima if len(fit.optima) else fit.theta[None, :]
    m = len(starts0)
    starts = np.tile(starts0, (n_samples, 1))
    sample = np.repeat(np.arange(n_samples), m)
    theta, f, _, conv = minimise(
        starts, N, D, loss, weights=weights, sample=sample, max_iter=max_iter
    )
    f = np.where(np.isfinite(f), f, np.inf).reshape(n_samples, m)
    pick = np.argmin(f, axis=1)
    th = theta.reshape(n_samples, m, 5)[np.arange(n_samples), pick]
    a, b, e, alpha, beta = th.T
    samples = np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)
    q = [(1 - level) / 2, (1 + level) / 2]
    derived = {
        "a": beta / (alpha + beta),
        "b": alpha / (alpha + beta),
        "G": _G(np.exp(a), np.exp(b), alpha, beta),
    }
    columns = dict(zip(NAMES, samples.T, strict=True)) | derived
    intervals = {k: tuple(float(v) for v in np.nanquantile(col, q)) for k, col in columns.items()}
    warns = list(fit.warnings)
    failed = int((~conv.reshape(n_samples, m)[np.arange(n_samples), pick]).sum())
    if failed:
        warns.append(f"{failed} of {n_samples} bootstrap refits did not converge")
    return replace(fit, samples=samples, level=level, intervals=intervals, warnings=warns)
