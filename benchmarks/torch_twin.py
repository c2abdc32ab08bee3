"""The benchmark model in PyTorch, a twin of the lab's for timing the CPU step side by side.

Same shapes as benchmarks/bench_train.py's model (d_model 512, 8 layers, 8 heads, SwiGLU 1536,
vocabulary 256, seq 512, 8 sequences a step), the same architecture (token embedding, rotary
positions, pre-norm RMSNorm blocks, causal attention, untied output head) and the same AdamW
(lr 3e-3, betas 0.9 / 0.95, eps 1e-8, decoupled weight decay 0.1, global-norm clip 1.0), all
float32: the same model FLOPs a step. Attention is torch's fused
`scaled_dot_product_attention(is_causal=True)`, eager mode. torch is an optional dependency
(the `bench` extra); benchmarks.against_torch runs this as a worker process:

    .venv/bin/python -m benchmarks.torch_twin   # prints "ready", then times a step per line
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

D_MODEL, N_LAYERS, N_HEADS, D_FF, VOCAB, SEQ, BATCH = 512, 8, 8, 1536, 256, 512, 8


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        return x_BxLxD * torch.rsqrt(x_BxLxD.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope_tables(seq_len: int, head_dim: int, theta: float = 10000.0):
    freqs_E2 = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_LxE2 = torch.arange(seq_len, dtype=torch.float32)[:, None] * freqs_E2[None, :]
    return torch.sin(angles_LxE2), torch.cos(angles_LxE2)


def apply_rope(x_BxHxLxE: torch.Tensor, sin_LxE2: torch.Tensor, cos_LxE2: torch.Tensor):
    x1, x2 = x_BxHxLxE.chunk(2, dim=-1)
    return torch.cat([x1 * cos_LxE2 - x2 * sin_LxE2, x2 * cos_LxE2 + x1 * sin_LxE2], dim=-1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        D, F_ = D_MODEL, D_FF
        self.attn_norm, self.mlp_norm = RMSNorm(D), RMSNorm(D)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.w_gate, self.w_up = nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False)
        self.w_down = nn.Linear(F_, D, bias=False)

    def forward(self, x_BxLxD, sin, cos):
        B, L, D = x_BxLxD.shape
        H, E = N_HEADS, D // N_HEADS
        h_BxLxD = self.attn_norm(x_BxLxD)
        q, k, v = (w(h_BxLxD).view(B, L, H, E).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out_BxHxLxE = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BxLxD = x_BxLxD + self.wo(out_BxHxLxE.transpose(1, 2).reshape(B, L, D))
        h_BxLxD = self.mlp_norm(x_BxLxD)
        return x_BxLxD + self.w_down(F.silu(self.w_gate(h_BxLxD)) * self.w_up(h_BxLxD))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.final_norm = RMSNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)
        sin, cos = rope_tables(SEQ, D_MODEL // N_HEADS)
        self.register_buffer("sin", sin)
        self.register_buffer("cos", cos)

    def forward(self, tokens_BxL: torch.Tensor) -> torch.Tensor:
        x_BxLxD = self.embed(tokens_BxL)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, self.sin, self.cos)
        return self.head(self.final_norm(x_BxLxD))


def build(seed: int = 0):
    """The model and its AdamW, as the lab's defaults (decay on matrices, not on norm scales,
    as lab.optim.optimizers)."""
    torch.manual_seed(seed)
    model = Transformer()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                             {"params": others, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, tokens_BxL1: torch.Tensor) -> float:
    """One step: forward, mean next-token cross-entropy, backward, clip, AdamW; the loss."""
    logits_BxLxV = model(tokens_BxL1[:, :-1])
    loss = F.cross_entropy(logits_BxLxV.reshape(-1, VOCAB), tokens_BxL1[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def main() -> None:
    model, opt = build()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen) for _ in range(2)]
    train_step(model, opt, batches[0])
    print("ready", flush=True)
    for i, _ in enumerate(sys.stdin):
        started = time.perf_counter()
        loss = train_step(model, opt, batches[i % 2])
        if loss != loss:
            raise RuntimeError("non-finite loss in the torch twin")
        print(time.perf_counter() - started, flush=True)


if __name__ == "__main__":
    main()
