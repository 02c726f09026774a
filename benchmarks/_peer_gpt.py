"""The simplest peer that bench_train.py holds llmtrain-train against: a GPT-2 block stack written for the benchmark
alone, in the way a single-file training script writes one (pre-norm blocks, one fused qkv matrix, PyTorch's
scaled_dot_product_attention, tied embeddings, no biases), trained by benchmarks/_bare_loop.py --peer with
torch.optim.AdamW at its defaults. It shares no code with llmtrain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PeerBlock(nn.Module):
    def __init__(self, width: int, heads: int, exact_gelu: bool) -> None:
        super().__init__()
        self.heads, self.gelu = heads, "none" if exact_gelu else "tanh"
        self.ln1, self.ln2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
        self.fc, self.fc_out = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.out(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate=self.gelu))


class PeerGPT(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int, heads: int, width: int, exact_gelu: bool = False) -> None:
        """``exact_gelu``: the exact (erf) GELU instead of GPT-2's tanh approximation."""
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(PeerBlock(width, heads, exact_gelu) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init: N(0, 0.02), the residual projections scaled by 1/sqrt(2 * layers)
                residual = name.endswith(("out.weight", "fc_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if residual else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
