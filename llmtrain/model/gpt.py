"""A decoder-only Transformer, GPT-2 through Llama style, as a plain ``nn.Module``.

Architecture only: no torch.distributed, DeepSpeed, logging or file I/O here. Each choice a user expects is a
field of ``ModelConfig``: norm (LayerNorm | RMSNorm), MLP (GELU | SwiGLU), positions (learned | RoPE),
grouped-query attention (``n_kv_head``), tied embeddings, dropout and biases. Attention goes through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU). For generation, a ``KVCache``
keeps the keys and values of past positions so each new token costs one position, not the whole prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llmtrain.config import MLP, ModelConfig, Norm, Positions
from llmtrain.model.moe import MixtureOfExperts, Router


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return out + self.bias if self.bias is not None else out


def build_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == Norm.rmsnorm:
        return RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.bias)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, head_dim // 2), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels; x is (B, T, nh, hs)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    Prompts of different lengths share a batch by left padding: the first ``pad[b]`` positions of row b are
    padding, which no real query attends to and which do not count as positions (row b's first real token is
    at position 0, exactly as when it is decoded alone).
    """

    def __init__(self, cfg: ModelConfig, pad: torch.Tensor, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, len(pad), cfg.block_size, cfg.kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=pad.device)
        self.v = torch.zeros(shape, dtype=dtype, device=pad.device)
        self.pad = pad
        self.length = 0
        """Positions (padding included) already stored."""
        self.attn_mask: torch.Tensor | None = None

    def begin(self, T: int) -> torch.Tensor:
        """Prepare to take T new positions: returns their (B, T) position ids and sets the attention mask."""
        end = self.length + T
        if end > self.k.shape[2]:
            raise ValueError(f"the KV cache holds {self.k.shape[2]} positions (block_size); {end} requested")
        query = torch.arange(self.length, end, device=self.pad.device)
        key = torch.arange(end, device=self.pad.device)
        allowed = (key[None, :] <= query[:, None])[None] & (key[None, None, :] >= self.pad[:, None, None])
        # A padding query may see only itself: its output is never used, and the softmax stays finite.
        allowed |= (key[None, :] == query[:, None])[None]
        self.attn_mask = allowed[:, None]  # (B, 1, T, end)
        return (query[None, :] - self.pad[:, None]).clamp(min=0)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new (B, T, nkv, hs) keys/values; return all of them so far."""
        end = self.length + k.shape[1]
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def end(self, T: int) -> None:
        self.length += T


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(hs)) v over (B, T, heads, hs) inputs, causal unless a mask is given; grouped-query
    attention repeats each kv head for its queries. A module of its own so that a sequence-parallel layout can put
    its all-to-all exchanges around it (``llmtrain.distributed.parallel``): it sees whole sequences of some heads."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves nh / nkv queries
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return y.transpose(1, 2)  # (B, T, nh, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim
        self.queries_per_kv = cfg.n_head // cfg.kv_heads
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.core = ScaledDotProductAttention(cfg.dropout)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        # The head counts come from the projection's width: a tensor-parallel layout gives this rank a column
        # slice of the q, k and v heads (llmtrain.distributed.parallel), in the same proportions.
        n_kv_head = qkv.shape[-1] // (self.head_dim * (self.queries_per_kv + 2))
        n_head = n_kv_head * self.queries_per_kv
        q, k, v = qkv.split([n_head * self.head_dim, n_kv_head * self.head_dim, n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, n_head, self.head_dim)  # (B, T, nh, hs)
        k = k.view(B, T, n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        v = v.view(B, T, n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.store(self.layer, k, v)
            y = self.core(q, k, v, cache.attn_mask)
        else:
            y = self.core(q, k, v)  # (B, T, nh, hs)
        return self.resid_dropout(self.proj(y.reshape(B, T, n_head * self.head_dim)))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == MLP.swiglu
        self.approximate = "none" if cfg.mlp == MLP.gelu_exact else "tanh"
        self.up = nn.Linear(cfg.n_embd, cfg.hidden * (2 if self.gated else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        self.down.is_residual_projection = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.up(x), approximate=self.approximate)
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1, self.attn = build_norm(cfg), CausalSelfAttention(cfg, layer)
        self.norm2 = build_norm(cfg)
        self.mlp = MixtureOfExperts(cfg, FeedForward) if cfg.is_sparse(layer) else FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, initialize: bool = True) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (from the dataset) before building the model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == Positions.learned else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm_f = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos == Positions.rope:
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        """Set by build_model: recompute each block's activations in backward (memory for compute)."""
        if initialize:  # else the weights are copied in next (model.init_from)
            self.apply(self.init_weights)

    def init_weights(self, module: nn.Module) -> None:
        """The initial values of ``module``'s own parameters, set only through ``self.apply``: a partitioned build
        gathers each module's parameters around it (see distributed.deepspeed.build_partitioned).
        GPT-2: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "is_residual_projection", False) else 1
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding | Router):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab); with targets, also the mean cross-entropy.

        With a ``cache`` (generation), idx continues the positions already in it, and it is extended. ``start``:
        the position of idx's first token, when idx is a slice of longer sequences (a sequence-parallel shard).
        """
        B, T = idx.shape
        if cache is None:
            if start + T > self.cfg.block_size:
                raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.cfg.block_size}")
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:
            pos = cache.begin(T)  # (B, T)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = self.drop(x)
        rope = None
        if self.cfg.pos == Positions.rope:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, hs/2) or (B, T, hs/2)
            rope = (cos[..., None, :], sin[..., None, :])  # (T, 1, hs/2) or (B, T, 1, hs/2): over the heads
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        if cache is not None:
            cache.end(T)
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @property
    def context_limit(self) -> int:
        """The most positions one sequence can hold (prompt + generated tokens)."""
        return self.cfg.block_size

    def new_cache(self, pad: torch.Tensor) -> KVCache:
        """An empty cache for a batch whose row b starts with pad[b] padding tokens."""
        return KVCache(self.cfg, pad, self.wte.weight.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out position embeddings (and the token table if untied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def active_params(self) -> int:
        """Non-embedding parameters one token computes with: a mixture of experts' k routed experts of n_experts
        (every parameter, for a dense model)."""
        cfg = self.cfg
        idle = 0
        for block in self.blocks:
            if isinstance(block.mlp, MixtureOfExperts):
                per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
                idle += (cfg.n_experts - cfg.experts_per_token) * per_expert
        return self.num_params() - idle

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B / nanoGPT), N = non-embedding parameters a
        token computes with (``active_params``: a mixture of experts counts its k routed experts).

        6N counts forward + backward matmuls with the weights (the tied output head is in N), 12*L*H*Q*T the
        attention scores and weighted sums (L layers, H heads, Q head size, T context).
        """
        cfg = self.cfg
        return 6 * self.active_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size
