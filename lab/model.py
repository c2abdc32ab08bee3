"""A decoder-only transformer in Flax NNX.

Token embedding, rotary positions, pre-norm RMSNorm blocks with causal (optionally grouped-query)
attention and a SwiGLU MLP, a final norm and an output head (optionally tied to the embedding).
Parameters are float32; `compute_dtype` only sets the matmul operands, which accumulate in float32,
so norms, softmax and the loss stay in float32 (bfloat16 elementwise work is slow on CPUs).

Tensor names carry their shapes: B batch, L sequence, D model width, H query heads, K key/value
heads, G query heads per key/value head, E head dim, F MLP width, V vocabulary, N layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lab.config import ModelConfig
from lab.sharding import constrain_activations
from lab.tree import path_names

# The hidden matrices: Muon's group, and μP's width-scaled learning rates.
HIDDEN_MATRICES = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def padded_vocab(data_vocab: int, multiple: int = 64) -> int:
    """The model vocabulary for a tokenizer's: rounded up so the head shards and tiles well."""
    return -(-data_vocab // multiple) * multiple


def _matrix(rngs: nnx.Rngs, fan_in: int, fan_out: int) -> nnx.Param:
    std = 1.0 / math.sqrt(fan_in)
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), (fan_in, fan_out), jnp.float32))


def _matmul(a: jax.Array, b: jax.Array, spec: str, dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _row_major(x: jax.Array) -> jax.Array:
    """x itself, materialised in row-major order before a matmul reads it.

    XLA gives a transposed array a permuted layout instead of moving data; a bfloat16 matmul
    that reads such an operand is then run in float32 by XLA's CPU backend (half the speed),
    and a transpose it can see is folded back into the matmul (a slow form). Going through a
    unit axis and an optimisation barrier makes XLA copy the data once, in row-major order.
    """
    return jax.lax.optimization_barrier(x[..., None])[..., 0]


def _transposed(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, as a real row-major copy."""
    return _row_major(x.swapaxes(-1, -2))


def _stash(x: jax.Array) -> jax.Array:
    """A residual kept for the backward pass; bfloat16 as its uint16 bit pattern.

    Under `scan_layers` the residuals of every layer are stacked by the loop, and XLA's CPU
    backend converts a stacked bfloat16 array to float32 and back (a full copy each way, and
    twice the memory); an integer array passes through untouched.
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _unstash(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def dense(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x @ w with operands in `dtype` and a float32 result.

    The backward pass is written by hand so that every matmul is a plain row-major product,
    the form XLA's CPU backend sends to its fast kernels: the weight gradient x^T @ dy would
    otherwise contract over the leading axis of both operands and run at half speed (and XLA
    may transpose the large operand to get there). We transpose the narrower of x and dy
    ourselves. The operands are kept for the backward pass already cast to `dtype`, so they
    are cast once, not twice.
    """
    return _dense(x, w, jnp.dtype(dtype), x.dtype, w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense(x, w, dtype, x_dtype, w_dtype):
    return _matmul(x, w, "...d,df->...f", dtype)


def _dense_fwd(x, w, dtype, x_dtype, w_dtype):
    x_lo, w_lo = x.astype(dtype), w.astype(dtype)
    return _matmul(x_lo, w_lo, "...d,df->...f", dtype), (_stash(x_lo), _stash(w_lo))


def _dense_bwd(dtype, x_dtype, w_dtype, residuals, dy):
    x_lo, w_lo = (_unstash(r) for r in residuals)
    d_in, d_out = w_lo.shape
    x_NxD = x_lo.reshape(-1, d_in)
    dy_NxF = dy.reshape(-1, d_out).astype(dtype)
    dx = _matmul(dy_NxF, w_lo, "nf,df->nd", dtype).reshape(x_lo.shape).astype(x_dtype)
    if d_in <= d_out:
        dw_DxF = _matmul(_transposed(x_NxD), dy_NxF, "dn,nf->df", dtype)
    else:  # transpose the narrower dy, and the small result back
        dw_DxF = _row_major(_matmul(_transposed(dy_NxF), x_NxD, "fn,nd->fd", dtype)).T
    return dx, dw_DxF.astype(w_dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...]


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin and cos of shape (L, E/2) for rotary position embeddings."""
    freqs_E2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_LxE2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freqs_E2[None, :]
    return jnp.sin(angles_LxE2), jnp.cos(angles_LxE2)


def apply_rope(x_BxLxHxE: jax.Array, sin_LxE2: jax.Array, cos_LxE2: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_BxLxHxE, 2, axis=-1)
    sin, cos = sin_LxE2[None, :, None, :], cos_LxE2[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = _matrix(rngs, D, H * E)
        self.wk = _matrix(rngs, D, K * E)
        self.wv = _matrix(rngs, D, K * E)
        self.wo = _matrix(rngs, H * E, D)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(E, cfg.norm_eps)
            self.k_norm = RMSNorm(E, cfg.norm_eps)
        self.cfg = cfg

    def __call__(self, x_BxLxD: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, L, _ = x_BxLxD.shape
        H, K, E = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        G = H // K
        dtype = jnp.dtype(cfg.compute_dtype)
        q_BxLxHxE = dense(x_BxLxD, self.wq[...], dtype).reshape(B, L, H, E)
        k_BxLxKxE = dense(x_BxLxD, self.wk[...], dtype).reshape(B, L, K, E)
        v_BxLxKxE = dense(x_BxLxD, self.wv[...], dtype).reshape(B, L, K, E)
        if cfg.qk_norm:
            q_BxLxHxE, k_BxLxKxE = self.q_norm(q_BxLxHxE), self.k_norm(k_BxLxKxE)
        q_BxLxHxE = apply_rope(q_BxLxHxE, sin, cos)
        k_BxLxKxE = apply_rope(k_BxLxKxE, sin, cos)
        # μP scales logits by 1/E (Yang et al. 2022), SP by 1/sqrt(E).
        scale = 1.0 / E if cfg.parameterization == "mup" else 1.0 / math.sqrt(E)
        # Heads first: (B, K, G, L, E), so each key/value head is one batched matmul.
        q_BxKxGxLxE = _row_major((q_BxLxHxE * scale).reshape(B, L, K, G, E)
                                 .transpose(0, 2, 3, 1, 4))
        k_BxKxLxE = _row_major(k_BxLxKxE.transpose(0, 2, 1, 3))
        v_BxKxLxE = _row_major(v_BxLxKxE.transpose(0, 2, 1, 3))
        out_BxKxGxLxE = causal_attention(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, dtype)
        out_BxLxHE = out_BxKxGxLxE.transpose(0, 3, 1, 2, 4).reshape(B, L, H * E)
        return dense(out_BxLxHE, self.wo[...], dtype)


# Query block of causal attention: blocks skip the keys after them (about half the scores at
# long sequences) and keep each block's slab of scores small.
ATTENTION_BLOCK = 128


def _query_blocks(L: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, L)) for s in range(0, L, block)]


def _block_rows(x_BxKxGxLxE: jax.Array, s: int, e: int) -> jax.Array:
    """Rows s:e of every query head, the G heads of a key/value head stacked: (B, K, G*C, E)."""
    B, K, G, _, E = x_BxKxGxLxE.shape
    return x_BxKxGxLxE[:, :, :, s:e].reshape(B, K, G * (e - s), E)


def _masked_logits(q_BxKxRxE, k_BxKxSxE, s: int, e: int, G: int, dtype) -> jax.Array:
    logits_BxKxRxS = _matmul(q_BxKxRxE, k_BxKxSxE, "bkre,bkse->bkrs", dtype)
    causal_RxS = np.tile(np.arange(s, e)[:, None] >= np.arange(e)[None, :], (G, 1))
    return jnp.where(causal_RxS, logits_BxKxRxS, -1e30)


def causal_attention(q_BxKxGxLxE: jax.Array, k_BxKxLxE: jax.Array, v_BxKxLxE: jax.Array,
                     dtype: jnp.dtype, block: int = ATTENTION_BLOCK) -> jax.Array:
    """softmax(q k^T + causal mask) v with float32 scores, in query blocks of `block` rows.

    Query block [s, e) attends to keys [0, e) only, so most of the masked upper triangle is
    never computed. The G query heads that share a key/value head are the rows of one matmul.
    Matmul operands are cast to `dtype`; the softmax stays float32. The backward pass
    recomputes each block's probabilities from the saved log-sum-exp instead of keeping
    them (as flash attention does): on a CPU the (L, L) slabs cost more in memory traffic
    than the extra q k^T costs in FLOPs. q, k and v share one dtype, as do their gradients.
    """
    return _attention(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, jnp.dtype(dtype), block,
                      q_BxKxGxLxE.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, dtype, block, in_dtype):
    return _attention_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, dtype, block, in_dtype)[0]


def _attention_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, dtype, block, in_dtype):
    B, K, G, L, E = q_BxKxGxLxE.shape
    q_lo, k_lo, v_lo = (x.astype(dtype) for x in (q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE))
    outs, lses = [], []
    for s, e in _query_blocks(L, block):
        logits_BxKxRxS = _masked_logits(_block_rows(q_lo, s, e), k_lo[:, :, :e], s, e, G, dtype)
        max_BxKxRx1 = jnp.max(logits_BxKxRxS, axis=-1, keepdims=True)
        exp_BxKxRxS = jnp.exp(logits_BxKxRxS - max_BxKxRx1)
        sum_BxKxRx1 = jnp.sum(exp_BxKxRxS, axis=-1, keepdims=True)
        # Normalise after the matmul: E columns to divide instead of S.
        out_BxKxRxE = _matmul(exp_BxKxRxS, v_lo[:, :, :e], "bkrs,bkse->bkre", dtype)
        outs.append((out_BxKxRxE / sum_BxKxRx1).reshape(B, K, G, e - s, E))
        lses.append(max_BxKxRx1 + jnp.log(sum_BxKxRx1))
    out_BxKxGxLxE = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    # The operands are kept already cast: the backward pass needs them in `dtype` anyway.
    return out_BxKxGxLxE, (_stash(q_lo), _stash(k_lo), _stash(v_lo), out_BxKxGxLxE, lses)


def _attention_bwd(dtype, block, in_dtype, residuals, dout_BxKxGxLxE):
    q_lo, k_lo, v_lo, out_BxKxGxLxE, lses = residuals
    q_lo, k_lo, v_lo = _unstash(q_lo), _unstash(k_lo), _unstash(v_lo)
    B, K, G, L, E = q_lo.shape
    dout_lo = dout_BxKxGxLxE.astype(dtype)
    dqs, dk_parts, dv_parts = [], [], []
    for (s, e), lse_BxKxRx1 in zip(_query_blocks(L, block), lses, strict=True):
        q_BxKxRxE = _block_rows(q_lo, s, e)
        dout_BxKxRxE = _block_rows(dout_lo, s, e)
        logits_BxKxRxS = _masked_logits(q_BxKxRxE, k_lo[:, :, :e], s, e, G, dtype)
        probs_BxKxRxS = jnp.exp(logits_BxKxRxS - lse_BxKxRx1)
        dprobs_BxKxRxS = _matmul(dout_BxKxRxE, v_lo[:, :, :e], "bkre,bkse->bkrs", dtype)
        delta_BxKxRx1 = jnp.sum(_block_rows(dout_BxKxGxLxE, s, e)
                                * _block_rows(out_BxKxGxLxE, s, e), axis=-1, keepdims=True)
        dlogits_BxKxRxS = probs_BxKxRxS * (dprobs_BxKxRxS - delta_BxKxRx1)
        dqs.append(_matmul(dlogits_BxKxRxS, k_lo[:, :, :e], "bkrs,bkse->bkre", dtype)
                   .reshape(B, K, G, e - s, E))
        # dk = dlogits^T q and dv = probs^T dout contract over the block's rows, the form the
        # CPU kernels handle badly; transpose the small (R, E) operands instead and compute
        # dk^T and dv^T as plain products.
        pad = ((0, 0), (0, 0), (0, 0), (0, L - e))
        dk_parts.append(jnp.pad(_matmul(_transposed(q_BxKxRxE), dlogits_BxKxRxS,
                                        "bker,bkrs->bkes", dtype), pad))
        dv_parts.append(jnp.pad(_matmul(_transposed(dout_BxKxRxE), probs_BxKxRxS,
                                        "bker,bkrs->bkes", dtype), pad))
    dq_BxKxGxLxE = jnp.concatenate(dqs, axis=3) if len(dqs) > 1 else dqs[0]
    return (dq_BxKxGxLxE.astype(in_dtype), _transposed(sum(dk_parts)).astype(in_dtype),
            _transposed(sum(dv_parts)).astype(in_dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ff_dim
        self.w_gate = _matrix(rngs, D, F)
        self.w_up = _matrix(rngs, D, F)
        self.w_down = _matrix(rngs, F, D)
        self.dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        gate_BxLxF = dense(x_BxLxD, self.w_gate[...], self.dtype)
        up_BxLxF = dense(x_BxLxD, self.w_up[...], self.dtype)
        return dense(jax.nn.silu(gate_BxLxF) * up_BxLxF, self.w_down[...], self.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxLxD: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), sin, cos)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        return constrain_activations(x_BxLxD)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, std: float, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(std)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), jnp.float32))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens_BxL, axis=0)


class Head(nnx.Module):
    def __init__(self, dim: int, vocab: int, rngs: nnx.Rngs):
        self.kernel = _matrix(rngs, dim, vocab)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (see padded_vocab)")
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, rngs)
        # Block i draws from its own stream, so scanned and unrolled models match exactly.
        blocks = [Block(cfg, nnx.Rngs(params=jax.random.fold_in(rngs.params(), i)))
                  for i in range(cfg.n_layers)]
        if cfg.scan_layers:
            graphdef, *_ = nnx.split(blocks[0])
            states = [nnx.split(b)[1] for b in blocks]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
            self.blocks = nnx.merge(graphdef, stacked)
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = Head(cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Logits (B, L, V) in float32."""
        cfg = self.cfg
        L = tokens_BxL.shape[1]
        sin, cos = rope_tables(L, cfg.head_dim, cfg.rope_theta)
        x_BxLxD = constrain_activations(self.embed(tokens_BxL))

        def run_block(graphdef, state, x):
            return nnx.merge(graphdef, state)(x, sin, cos)

        if cfg.remat != "none":
            run_block = jax.checkpoint(run_block, policy=_REMAT_POLICIES[cfg.remat],
                                       static_argnums=(0,))
        if cfg.scan_layers:
            graphdef, state_N = nnx.split(self.blocks)
            x_BxLxD, _ = jax.lax.scan(lambda x, s: (run_block(graphdef, s, x), None),
                                      x_BxLxD, state_N)
        else:
            for block in self.blocks:
                graphdef, state = nnx.split(block)
                x_BxLxD = run_block(graphdef, state, x_BxLxD)
        x_BxLxD = self.final_norm(x_BxLxD)
        w_DxV = self.embed.embedding[...].T if cfg.tie_embeddings else self.head.kernel[...]
        logits_BxLxV = dense(x_BxLxD, w_DxV, jnp.dtype(cfg.compute_dtype))
        if cfg.parameterization == "mup":
            # μP output multiplier: logits shrink as 1/width relative to the base width.
            logits_BxLxV = logits_BxLxV * (cfg.mup_base_width / cfg.d_model)
        return logits_BxLxV


def loss_fn(model: Transformer, tokens_BxL1: jax.Array) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy (plus z-loss) over a (B, L+1) window of tokens."""
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    logits_BxLxV = model(inputs_BxL)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    ce = jnp.mean(lse_BxL - target_logit_BxL)
    loss = ce
    if model.cfg.z_loss:
        loss = loss + model.cfg.z_loss * jnp.mean(lse_BxL**2)
    return loss, {"ce": ce}


# ----------------------------------------------------------------------------- accounting


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts from the shapes: total, non-embedding (total minus the input
    embedding; an untied head counts as non-embedding) and the matmul weights."""
    D, H, K, E, F, V = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim,
                        cfg.vocab_size)
    attention = D * H * E + 2 * D * K * E + H * E * D
    mlp = 3 * D * F
    norms = 2 * D + (2 * E if cfg.qk_norm else 0)
    per_layer = attention + mlp + norms
    embedding = V * D
    head = 0 if cfg.tie_embeddings else D * V
    total = embedding + cfg.n_layers * per_layer + D + head
    return {
        "params": total,
        "non_embedding_params": total - embedding,
        "matmul_params": cfg.n_layers * (attention + mlp) + D * V,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4), the output head
    included even when tied, plus attention's scores and weighted sum, 12·L·s·d_attn for full
    attention, counted once for the causal half: 6·n_layers·seq_len·(n_heads·head_dim)."""
    counts = param_counts(cfg)
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6 * counts["matmul_params"] + attention


def mup_lr_scales(cfg: ModelConfig, params) -> object:
    """Per-parameter learning-rate multipliers: μP gives hidden matrices base_width / width
    (Adam LR ∝ 1/fan_in, Tensor Programs V Table 3); SP gives 1 everywhere."""
    ratio = cfg.mup_base_width / cfg.d_model if cfg.parameterization == "mup" else 1.0

    def one(path, leaf):
        return ratio if path_names(path)[-1] in HIDDEN_MATRICES else 1.0

    return jax.tree_util.tree_map_with_path(one, params)


def with_vocab(cfg: ModelConfig, data_vocab: int) -> ModelConfig:
    """Fill in vocab_size from the data when the config leaves it at 0."""
    if cfg.vocab_size:
        return cfg
    return dataclasses.replace(cfg, vocab_size=padded_vocab(data_vocab))
