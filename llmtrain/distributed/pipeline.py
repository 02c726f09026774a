"""Pipeline parallel: the GPT as DeepSpeed layer specs, cut into stages and run by DeepSpeed's pipeline engine
(``train_batch`` / ``eval_batch``, 1F1B schedule). Nothing here is a layer of our own: the pieces are the model's
modules (``llmtrain.model.gpt``: ``Block``, the norm, the embedding tables), each in a thin holder that gives it
the one-tensor-in, one-tensor-out form a pipeline stage needs.

    specs:  embed (tied) | positions + dropout | Block x n_layer | final norm | head (tied embed, or lm_head)

The tied embedding is a ``TiedLayerSpec`` holding the token table alone (``wte.weight``), used by the first spec
and, as the head (``F.linear`` with it), by the last: DeepSpeed keeps only ``tied_weight_attr`` in sync between the
two stages, so the learned position table has a spec of its own, on the first stage only. Parameter names map
back to the model's (``model_name``): ``tied_modules.embed.wte.weight`` is ``wte.weight``, the block at spec
index i is ``blocks.{i - 2}``, and the other holders keep the model's attribute names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llmtrain.config import ModelConfig, Positions
from llmtrain.errors import AgreedError
from llmtrain.model.gpt import Block, build_norm, rope_tables

TIED = "embed"
FIRST_BLOCK = 2
"""The spec index of block 0: after the token embedding and the positions."""
IGNORE = -100
"""The target of an evaluation micro-batch's padding rows (``PipelineLoss``)."""


class TokenEmbedding(nn.Module):
    """The token table: the first stage's embedding and, tied, the last stage's head (``head_logits``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)


def head_logits(module: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The tied head: logits with the token table."""
    return F.linear(x, module.wte.weight)


class PositionsAndDropout(nn.Module):
    """The learned position table (when the model has one) added to the token embeddings, then dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == Positions.learned else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)


class PipelineBlock(Block):
    """The model's ``Block`` with the rotary tables it needs (a copy per block, not saved) and per-block activation
    checkpointing (``dist.activation_checkpointing``, as the model does it)."""

    def __init__(self, cfg: ModelConfig, layer: int, checkpointing: bool) -> None:
        super().__init__(cfg, layer)
        self.checkpointing = checkpointing
        self.rope = cfg.pos == Positions.rope
        if self.rope:
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = None
        if self.rope:
            T = x.shape[1]
            rope = (self.rope_cos[:T, None, :], self.rope_sin[:T, None, :])
        if self.checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(super().forward, x, rope, use_reentrant=False)
        return super().forward(x, rope)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_f = build_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x)


class Head(nn.Module):
    """The untied output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


class PipelineLoss:
    """The loss the last stage computes: the model's mean cross-entropy while training; while evaluating, the sum
    over the real targets, so that an evaluation micro-batch padded to the micro-batch size (targets ``IGNORE``)
    adds exactly its real rows (the caller counts them)."""

    def __init__(self) -> None:
        self.summing = False

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat_logits, flat_targets = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)
        if not self.summing:
            return F.cross_entropy(flat_logits, flat_targets)
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum")


def layer_specs(cfg: ModelConfig, checkpointing: bool) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = TiedLayerSpec(TIED, TokenEmbedding, cfg, tied_weight_attr=["wte.weight"])
    head = (TiedLayerSpec(TIED, TokenEmbedding, cfg, forward_fn=head_logits, tied_weight_attr=["wte.weight"])
            if cfg.tie_embeddings else LayerSpec(Head, cfg))
    blocks = [LayerSpec(PipelineBlock, cfg, layer, checkpointing) for layer in range(cfg.n_layer)]
    return [embed, LayerSpec(PositionsAndDropout, cfg), *blocks, LayerSpec(FinalNorm, cfg), head]


def model_name(name: str, n_layer: int) -> str:
    """The model's name of a pipeline module's parameter (see the module's docstring)."""
    if name.startswith(f"tied_modules.{TIED}."):
        return name[len(f"tied_modules.{TIED}."):]
    index, rest = name.split(".", 1)
    layer = int(index) - FIRST_BLOCK
    return f"blocks.{layer}.{rest}" if 0 <= layer < n_layer else rest


class MicroBatchCounter:
    """A forward pre-hook on the pipeline module: before each training forward of a micro-batch on this stage it
    calls ``on_micro_batch(micro)``, ``micro`` counting this step's micro-batches from 0 (``begin_step``). The
    trainer seeds dropout there, by (seed, step, micro-batch, rank), so that a resume needs no RNG state; the
    engine's activation-checkpointing recomputation does not call the module again."""

    def __init__(self, on_micro_batch: Callable[[int], None]) -> None:
        self.on_micro_batch = on_micro_batch
        self.micro = 0

    def begin_step(self) -> None:
        self.micro = 0

    def __call__(self, module: nn.Module, args) -> None:
        if module.training:
            self.on_micro_batch(self.micro)
            self.micro += 1


def pipe_name(name: str, n_layer: int, tie_embeddings: bool) -> str:
    """The pipeline module's name of a model parameter (``model_name``'s inverse)."""
    if name.startswith("blocks."):
        _, layer, rest = name.split(".", 2)
        return f"{int(layer) + FIRST_BLOCK}.{rest}"
    if name == "wte.weight" or (tie_embeddings and name == "lm_head.weight"):
        return f"tied_modules.{TIED}.wte.weight"
    index = {"wpe": 1, "norm_f": FIRST_BLOCK + n_layer, "lm_head": FIRST_BLOCK + n_layer + 1}[name.split(".")[0]]
    return f"{index}.{name}"


def build_pipeline(cfg: ModelConfig, partition: str, checkpointing: bool, topology, dualpipev: bool) -> nn.Module:
    """The GPT as DeepSpeed's ``PipelineModule`` on ``topology`` (DeepSpeed's grid; this rank builds its own
    stage's layers only), or with ``dualpipev`` its ``DualPipeVModule`` (2 x stages pieces, rank r holding pieces r
    and 2 x stages - 1 - r: the tied embedding and head both on rank 0). A partition that leaves a stage (or a
    DualPipeV piece) without a block is refused in one line."""
    from deepspeed.pipe import DualPipeVModule, PipelineModule

    kind = DualPipeVModule if dualpipev else PipelineModule
    module = kind(layer_specs(cfg, checkpointing), topology=topology, loss_fn=PipelineLoss(),
                  partition_method=partition)
    blocks = [sum(FIRST_BLOCK <= i < FIRST_BLOCK + cfg.n_layer for i in range(start, stop))
              for start, stop in zip(module.parts[:-1], module.parts[1:], strict=True)]
    if 0 in blocks:
        piece = "DualPipeV piece(s)" if dualpipev else "stage(s)"
        raise AgreedError(f"dist.pipeline_partition={partition} gives {piece} "
                          f"{[s for s, n in enumerate(blocks) if n == 0]} no block (blocks per {piece[:-3]}: "
                          f"{blocks}); use dist.pipeline_partition=type:Block or fewer stages")
    return module
