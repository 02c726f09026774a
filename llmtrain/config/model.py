"""The model: ``model.*``, a decoder-only Transformer or the LSTM baseline."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from llmtrain.config.checks import MAX_CONTEXT, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, bounded, bounded_each, raise_problems


class Arch(str, Enum):
    """The model family: the Transformer, or the recurrent baseline it must beat."""

    gpt = "gpt"
    lstm = "lstm"


class Norm(str, Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class MLP(str, Enum):
    gelu = "gelu"
    gelu_exact = "gelu_exact"
    swiglu = "swiglu"


class Positions(str, Enum):
    learned = "learned"
    rope = "rope"

@dataclass(kw_only=True)
class ModelConfig:
    """The model: a decoder-only Transformer or the LSTM baseline (``model=<preset>`` picks conf/model/)."""

    name: str = "custom"
    """Preset name, for logs and exports."""
    arch: Arch = Arch.gpt
    """gpt (decoder-only Transformer) | lstm (embedding -> n_layer LSTM of width n_embd -> head; a baseline)."""
    n_layer: int = 4
    """Number of Transformer blocks (LSTM layers for arch=lstm)."""
    n_head: int = 4
    """Attention heads (query heads)."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 = n_head (plain multi-head attention)."""
    n_embd: int = 128
    """Residual stream width."""
    block_size: int = 256
    """Context length in tokens (the training window; a limit on generation for arch=gpt only)."""
    vocab_size: int = 0
    """Vocabulary size; 0 = take it from the prepared dataset (the usual case)."""
    norm: Norm = Norm.layernorm
    """Normalization: layernorm | rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    mlp: MLP = MLP.gelu
    """Feed-forward: gelu (4x width; GELU's tanh approximation, as GPT-2) | gelu_exact (the same with the exact,
    erf GELU: faster on CPUs) | swiglu (gated, hidden width mlp_hidden)."""
    mlp_hidden: int = 0
    """Feed-forward hidden width; 0 = 4*n_embd for gelu, 8/3*n_embd rounded up to a multiple of 64 for swiglu."""
    pos: Positions = Positions.learned
    """Positions: learned absolute embeddings | rope (rotary)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings."""
    bias: bool = False
    """Biases in linear layers and norms."""
    init_std: float = 0.02
    """Standard deviation of the weight init; residual projections get init_std / sqrt(2 * n_layer)."""
    n_experts: int = 0
    """Experts per sparse block (a mixture of experts); 0 = dense. Each expert is a feed-forward of model.mlp's kind,
    hidden width model.moe_hidden."""
    moe_every: int = 1
    """Which blocks are sparse (transformers' rule): block i when (i + 1) % moe_every == 0; 1 = every block."""
    experts_per_token: int = 2
    """k: the experts each token is routed to, by the top k of a softmax router computed in fp32."""
    router_renormalize: bool = True
    """Scale each token's k router weights to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob); false = the
    softmax probabilities as they are (Switch's top-1, Qwen2-MoE's default)."""
    n_shared_experts: int = 0
    """Experts every token goes through besides its k routed ones (DeepSeek, Qwen2-MoE): held as one feed-forward of
    n_shared_experts x model.moe_hidden width."""
    moe_hidden: int = 0
    """Hidden width of each expert; 0 = the dense feed-forward's (model.mlp_hidden's rule)."""
    capacity_factor: float = 0.0
    """0 = dropless: every routed token is computed. > 0: each expert takes at most ceil(k x tokens / n_experts x
    capacity_factor) tokens of a micro-batch (per rank), in token order; the routes past it are dropped (the token
    keeps its residual and its other experts)."""
    init_from: str = ""
    """Start from these weights: a transformers folder (GPT-2, Llama, Mixtral or Qwen2-MoE) or an llmtrain export,
    checkpoint or run. Its architecture replaces the fields above except block_size (the training window), dropout
    and capacity_factor."""

    def __post_init__(self) -> None:
        problems = bounded_each("model.", self, {
            "n_layer": (1, MAX_LAYERS), "n_head": (1, MAX_LAYERS), "n_kv_head": (0, MAX_LAYERS),
            "n_embd": (1, MAX_WIDTH), "block_size": (1, MAX_CONTEXT), "vocab_size": (0, MAX_VOCAB),
            "mlp_hidden": (0, 4 * MAX_WIDTH), "n_experts": (0, 1 << 16), "moe_every": (1, MAX_LAYERS),
            "experts_per_token": (1, 1 << 16), "n_shared_experts": (0, 1 << 16), "moe_hidden": (0, 4 * MAX_WIDTH)})
        if not problems:  # the shape checks divide by these sizes
            problems += self._shape_problems()
        problems += bounded("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        problems += bounded("model.capacity_factor", self.capacity_factor, 0.0, 1e6)
        if self.n_experts > 0 and self.experts_per_token > self.n_experts:
            problems.append(f"model.experts_per_token={self.experts_per_token} is more than model.n_experts="
                            f"{self.n_experts}")
        if self.n_experts > 0 and self.arch != Arch.gpt:
            problems.append(f"model.n_experts={self.n_experts} makes the Transformer's feed-forwards mixtures of "
                            f"experts; model.arch={self.arch.value} has none")
        for name in ("norm_eps", "rope_theta", "init_std"):
            problems += bounded(f"model.{name}", getattr(self, name), 0.0, low_open=True)
        raise_problems(problems, "model")

    def _shape_problems(self) -> list[str]:
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            return [f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}"]
        if self.n_head % kv:
            return [f"model.n_head={self.n_head} must be divisible by model.n_kv_head={kv}"]
        if self.pos == Positions.rope and (self.n_embd // self.n_head) % 2:
            return [f"model.pos=rope needs an even head size, got {self.n_embd // self.n_head}"]
        return []

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_sparse(self, layer: int) -> bool:
        """Whether block ``layer``'s feed-forward is a mixture of experts (transformers' moe_every rule)."""
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_sparse(i)]

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden or self.hidden

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == MLP.swiglu:
            return -(-int(8 * self.n_embd / 3) // 64) * 64
        return 4 * self.n_embd
