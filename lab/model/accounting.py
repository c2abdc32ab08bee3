"""What a model costs, from its config alone: exact parameter counts, training FLOPs per token,
and the vocabulary padded for the head. Nothing here builds the model (lab.model.transformer
does)."""

from __future__ import annotations

import dataclasses

from lab.config import ModelConfig


def padded_vocab(data_vocab: int, multiple: int = 64) -> int:
    """The model vocabulary for a tokenizer's: rounded up so the head shards and tiles well."""
    return -(-data_vocab // multiple) * multiple


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts from the shapes: total (`params`, also `total_params`),
    `active_params` (those one token goes through: a mixture of experts' top_k routed experts
    of its E, the router, the shared experts; equal to the total for a dense model),
    non-embedding (total minus the input embedding; an untied head counts as non-embedding),
    and the matmul weights, all of them and those one token uses (`active_matmul_params`)."""
    D, H, K, E, V = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
    moe = cfg.moe
    attention = D * H * E + 2 * D * K * E + H * E * D
    norms = 2 * D + (2 * E if cfg.qk_norm else 0)
    if moe.experts:
        expert = 3 * D * cfg.expert_ff_dim
        router = D * moe.experts
        bias = moe.experts if moe.router == "sigmoid" and moe.bias_rate else 0
        shared = moe.shared_experts * expert
        mlp = router + moe.experts * expert + shared
        active_mlp = router + moe.top_k * expert + shared
    else:
        bias, mlp = 0, 3 * D * cfg.ff_dim
        active_mlp = mlp
    per_layer = attention + mlp + norms + bias
    embedding = V * D
    head = 0 if cfg.tie_embeddings else D * V
    total = embedding + cfg.n_layers * per_layer + D + head
    inactive = cfg.n_layers * (mlp - active_mlp)
    return {
        "params": total,
        "total_params": total,
        "active_params": total - inactive,
        "non_embedding_params": total - embedding,
        "matmul_params": cfg.n_layers * (attention + mlp) + D * V,
        "active_matmul_params": cfg.n_layers * (attention + active_mlp) + D * V,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul weight a token goes through (forward 2, backward
    4; for a mixture of experts the router and its top_k experts, not all E), the output head
    included even when tied, plus attention's scores and weighted sum, 12·L·s·d_attn for full
    attention, counted once for the causal half: 6·n_layers·seq_len·(n_heads·head_dim)."""
    counts = param_counts(cfg)
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6 * counts["active_matmul_params"] + attention


def with_vocab(cfg: ModelConfig, data_vocab: int) -> ModelConfig:
    """Fill in vocab_size from the data when the config leaves it at 0."""
    if cfg.vocab_size:
        return cfg
    return dataclasses.replace(cfg, vocab_size=padded_vocab(data_vocab))
