"""A decoder-only transformer in Flax NNX.

Token embedding, rotary positions, pre-norm RMSNorm blocks with causal (optionally grouped-query)
attention and a SwiGLU MLP, a final norm and an output head (optionally tied to the embedding).
Parameters are float32; `compute_dtype` sets the matmul operands, which accumulate in float32, and
`activation_dtype` the residual stream and block outputs; norm and softmax statistics and the
loss stay float32 (bfloat16 elementwise work is slow on CPUs). How the matmuls and attention run
on the target platform (CPU-tuned kernels, cuDNN, Pallas splash) is lab.model.kernels' business.

Tensor names carry their shapes: B batch, L sequence, D model width, H query heads, K key/value
heads, G query heads per key/value head, E head dim, F MLP width, V vocabulary, N layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lab.accel.sharding import constrain_activations
from lab.config import ModelConfig
from lab.model import layer_stats
from lab.model.kernels import Kernels, cross_entropy
from lab.model.moe import MoE
from lab.model.remat import ATTENTION_OUT
from lab.model.remat import POLICIES as REMAT_POLICIES
from lab.model.roles import Role, param, specs_of, stack


def _matrix(rngs: nnx.Rngs, fan_in: int, fan_out: int, axes: tuple[str, str],
            role: Role = Role.HIDDEN) -> nnx.Param:
    std = 1.0 / math.sqrt(fan_in)
    init = jax.nn.initializers.truncated_normal(std)
    return param(init(rngs.params(), (fan_in, fan_out), jnp.float32), axes, role)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = param(jnp.ones((dim,), jnp.float32), ("norm",), Role.NORM)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """The norm in float32, returned in x's dtype."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin and cos of shape (L, E/2) for rotary position embeddings."""
    freqs_E2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_LxE2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freqs_E2[None, :]
    return jnp.sin(angles_LxE2), jnp.cos(angles_LxE2)


def apply_rope(x_BxLxHxE: jax.Array, sin_LxE2: jax.Array, cos_LxE2: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_BxLxHxE, 2, axis=-1)
    sin, cos = sin_LxE2[None, :, None, :], cos_LxE2[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                           axis=-1).astype(x_BxLxHxE.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, rngs: nnx.Rngs):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = _matrix(rngs, D, H * E, ("embed", "heads"))
        self.wk = _matrix(rngs, D, K * E, ("embed", "kv_heads"))
        self.wv = _matrix(rngs, D, K * E, ("embed", "kv_heads"))
        self.wo = _matrix(rngs, H * E, D, ("heads", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(E, cfg.norm_eps)
            self.k_norm = RMSNorm(E, cfg.norm_eps)
        self.cfg, self.kernels = cfg, kernels

    def __call__(self, x_BxLxD: jax.Array, sin: jax.Array, cos: jax.Array) -> tuple:
        """The output and each sequence's largest logit per head (B, H) (lab.optim.qk_clip)."""
        cfg, dense = self.cfg, self.kernels.dense
        B, L, _ = x_BxLxD.shape
        H, K, E = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # Names for the remat policies (REMAT_POLICIES).
        q_BxLxHxE = checkpoint_name(dense(x_BxLxD, self.wq[...]), "q_proj").reshape(B, L, H, E)
        k_BxLxKxE = checkpoint_name(dense(x_BxLxD, self.wk[...]), "k_proj").reshape(B, L, K, E)
        v_BxLxKxE = checkpoint_name(dense(x_BxLxD, self.wv[...]), "v_proj").reshape(B, L, K, E)
        if cfg.qk_norm:
            q_BxLxHxE, k_BxLxKxE = self.q_norm(q_BxLxHxE), self.k_norm(k_BxLxKxE)
        q_BxLxHxE = apply_rope(q_BxLxHxE, sin, cos)
        k_BxLxKxE = apply_rope(k_BxLxKxE, sin, cos)
        # μP scales logits by 1/E (Yang et al. 2022), SP by 1/sqrt(E).
        scale = 1.0 / E if cfg.parameterization == "mup" else 1.0 / math.sqrt(E)
        out_BxLxHxE, max_logit_BxH = self.kernels.attend(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale)
        out_BxLxD = dense(checkpoint_name(out_BxLxHxE, ATTENTION_OUT).reshape(B, L, H * E),
                          self.wo[...])
        return checkpoint_name(out_BxLxD, "out_proj"), max_logit_BxH


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, rngs: nnx.Rngs, width: int = 0):
        D, F = cfg.d_model, width or cfg.ff_dim  # width 0: model.d_ff
        self.w_gate = _matrix(rngs, D, F, ("embed", "mlp"))
        self.w_up = _matrix(rngs, D, F, ("embed", "mlp"))
        self.w_down = _matrix(rngs, F, D, ("mlp", "embed"))
        self.kernels = kernels

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dense = self.kernels.dense
        gate_BxLxF = checkpoint_name(dense(x_BxLxD, self.w_gate[...]), "mlp_gate")
        up_BxLxF = checkpoint_name(dense(x_BxLxD, self.w_up[...]), "mlp_up")
        return checkpoint_name(dense(jax.nn.silu(gate_BxLxF) * up_BxLxF, self.w_down[...]),
                               "mlp_out")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, kernels, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.routed = cfg.moe.experts > 0  # a mixture of experts (lab.model.moe)
        self.mlp = (MoE(cfg, rngs, kernels.platform, lambda width: MLP(cfg, kernels, rngs, width))
                    if self.routed else MLP(cfg, kernels, rngs))

    def __call__(self, x_BxLxD: jax.Array, sin: jax.Array, cos: jax.Array
                 ) -> tuple[jax.Array, dict]:
        """The block's output and its statistics (LayerStats: float32 arrays, keyed by name)."""
        attn_BxLxD, max_logit_BxH = self.attn(self.attn_norm(x_BxLxD), sin, cos)
        x_BxLxD = x_BxLxD + attn_BxLxD
        h_BxLxD = self.mlp_norm(x_BxLxD)
        y_BxLxD, stats = self.mlp(h_BxLxD) if self.routed else (self.mlp(h_BxLxD), {})
        return (constrain_activations(x_BxLxD + y_BxLxD),
                {layer_stats.MAX_LOGIT: max_logit_BxH, **stats})


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, std: float, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(std)
        self.embedding = param(init(rngs.params(), (vocab, dim), jnp.float32),
                               ("vocab", "embed"), Role.EMBEDDING)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens_BxL, axis=0)


class Head(nnx.Module):
    def __init__(self, dim: int, vocab: int, rngs: nnx.Rngs):
        self.kernel = _matrix(rngs, dim, vocab, ("embed", "vocab"), Role.HEAD)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, platform: str | None = None):
        """`platform` (cpu | gpu | tpu; None = JAX's default backend) is the one the model will
        run on, which picks its kernels (lab.model.kernels); pass the mesh devices' platform."""
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (lab.model.accounting.with_vocab)")
        self.cfg = cfg
        self.kernels = Kernels.build(cfg, platform)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, rngs)
        # Block i draws from its own stream, so scanned and unrolled models match exactly.
        blocks = [Block(cfg, self.kernels, nnx.Rngs(params=jax.random.fold_in(rngs.params(), i)))
                  for i in range(cfg.n_layers)]
        if cfg.scan_layers:
            graphdef, *_ = nnx.split(blocks[0])
            # One block whose parameters have a leading "layers" axis.
            self.blocks = nnx.merge(graphdef, stack([nnx.split(b)[1] for b in blocks],
                                                    jnp.stack))
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = Head(cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Logits (B, L, V) in float32."""
        return self.logits(self.hidden(tokens_BxL))

    def hidden(self, tokens_BxL: jax.Array) -> jax.Array:
        """The final-normed hidden states (B, L, D) in the activation dtype."""
        return self.hidden_and_stats(tokens_BxL)[0]

    def hidden_and_stats(self, tokens_BxL: jax.Array) -> tuple[jax.Array, dict]:
        """The final-normed hidden states and every block's statistics, each with a leading
        layer axis N (see lab.model.layer_stats)."""
        cfg = self.cfg
        L = tokens_BxL.shape[1]
        sin, cos = rope_tables(L, cfg.head_dim, cfg.rope_theta)
        x_BxLxD = constrain_activations(self.embed(tokens_BxL).astype(cfg.activation_dtype))

        def run_block(graphdef, state, x):
            return nnx.merge(graphdef, state)(x, sin, cos)

        if cfg.remat == "auto":
            raise ValueError("model.remat=auto is chosen per chip (lab.model.memory.resolve_remat) "
                             "before the model is built")
        if cfg.remat != "none":
            # Under scan the loop already keeps XLA from merging the recomputation into the
            # forward pass, so no optimization barrier is needed (it would block fusions).
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[cfg.remat],
                                       static_argnums=(0,), prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            graphdef, state_N = nnx.split(self.blocks)
            x_BxLxD, stats_N = jax.lax.scan(lambda x, s: run_block(graphdef, s, x),
                                            x_BxLxD, state_N)
        else:
            stats = []
            for block in self.blocks:
                graphdef, state = nnx.split(block)
                x_BxLxD, block_stats = run_block(graphdef, state, x_BxLxD)
                stats.append(block_stats)
            stats_N = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
        return self.final_norm(x_BxLxD), stats_N

    def logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """The output head on hidden states (any leading axes), float32."""
        cfg = self.cfg
        w_DxV = self.embed.embedding[...].T if cfg.tie_embeddings else self.head.kernel[...]
        logits_BxLxV = self.kernels.dense(x_BxLxD, w_DxV, "float32")
        if cfg.parameterization == "mup":
            # μP output multiplier: logits shrink as 1/width relative to the base width.
            logits_BxLxV = logits_BxLxV * (cfg.mup_base_width / cfg.d_model)
        return logits_BxLxV


def loss_fn(model: Transformer, tokens_BxL1: jax.Array) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy (plus z-loss and any blocks' auxiliary losses) over a
    (B, L+1) window of tokens; in chunks of `model.loss_chunk` tokens when set, so the whole
    logits never exist at once. The aux dict has the cross-entropy and the layer stats."""
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    cfg = model.cfg
    hidden_BxLxD, stats_N = model.hidden_and_stats(inputs_BxL)
    loss, ce = cross_entropy(model.logits, hidden_BxLxD, targets_BxL, cfg.z_loss,
                             cfg.loss_chunk)
    if layer_stats.AUX_LOSS in stats_N:
        loss = loss + layer_stats.auxiliary_loss(stats_N)
    return loss, {"ce": ce, "layer_stats": stats_N}


def param_specs(cfg: ModelConfig) -> dict:
    """Every parameter's logical axes and role (lab.model.roles.ParamSpec), in a tree like the
    model's parameters as nested dicts; from the abstract model, so nothing is allocated."""
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return specs_of(nnx.state(model, nnx.Param))


def mup_lr_scales(cfg: ModelConfig, specs) -> object:
    """Per-parameter learning-rate multipliers for a tree of ParamSpecs: μP gives hidden
    matrices base_width / width (Adam LR ∝ 1/fan_in, Tensor Programs V Table 3); SP gives 1
    everywhere."""
    ratio = cfg.mup_base_width / cfg.d_model if cfg.parameterization == "mup" else 1.0
    return jax.tree.map(lambda spec: ratio if spec.role is Role.HIDDEN else 1.0, specs)
