"""The layout of the ranks, world = dp x tp x sp, and the one place that applies tensor and sequence parallelism to a
model. Neither is hand-written: DeepSpeed's AutoTP splits the attention and MLP matrices (from the partition
config written here for llmtrain's module names), and DeepSpeed's Ulysses ``DistributedAttention`` puts an
all-to-all around attention, so that each rank of a sequence-parallel group holds T/sp positions everywhere else
and whole sequences of nh/sp heads inside attention.

Ranks are laid out model-parallel innermost: ranks r..r+tp*sp-1 form one tensor- or sequence-parallel group and
read the same sequences; the data-parallel rank is rank // (tp * sp).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmtrain.config import MLP, DistConfig, ModelConfig
from llmtrain.errors import AgreedError

log = logging.getLogger("llmtrain")


@dataclass(frozen=True)
class Topology:
    """Which part of the work one rank does: its pipeline stage (pp), its data-parallel rank, and its slice of the
    layers (tp) or of every sequence (sp). Ranks are laid out as DeepSpeed's pipeline grid lays them out
    (``PipeModelDataParallelTopology``: pipe outermost, then data, then model): rank = ((stage x dp) + dp_rank) x
    tp x sp + the rank inside its tensor- or sequence-parallel group."""

    rank: int
    world_size: int
    tp: int = 1
    sp: int = 1
    pp: int = 1
    ep: int = 1
    """Expert-parallel ranks: consecutive data-parallel ranks that split each mixture of experts' experts."""

    @classmethod
    def of(cls, cfg: DistConfig, rank: int, world_size: int) -> Topology:
        model_parallel = cfg.pipeline_parallel * cfg.tensor_parallel * cfg.sequence_parallel
        if world_size % model_parallel:
            axes = [f"dist.{axis}={degree}" for axis, degree in (("pipeline_parallel", cfg.pipeline_parallel),
                                                                 ("tensor_parallel", cfg.tensor_parallel),
                                                                 ("sequence_parallel", cfg.sequence_parallel))
                    if degree > 1]
            raise AgreedError(f"{' x '.join(axes)} does not divide the {world_size} rank(s) of this job; launch a "
                              f"multiple of {model_parallel} ranks")
        if world_size % (model_parallel * cfg.expert_parallel):
            raise AgreedError(f"dist.expert_parallel={cfg.expert_parallel} does not divide the "
                              f"{world_size // model_parallel} data-parallel rank(s) of this job; launch a multiple "
                              f"of {cfg.expert_parallel} ranks")
        return cls(rank, world_size, cfg.tensor_parallel, cfg.sequence_parallel, cfg.pipeline_parallel,
                   cfg.expert_parallel)

    @property
    def inner(self) -> int:
        """Ranks of one tensor- or sequence-parallel group."""
        return self.tp * self.sp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: groups that read different sequences."""
        return self.world_size // (self.inner * self.pp)

    def _coord(self):
        """This rank's (pipe, data, model) coordinates in DeepSpeed's grid."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.inner, num_dp=self.dp).get_coord(self.rank)

    @property
    def dp_rank(self) -> int:
        return self._coord().data if self.pp > 1 else self.rank // self.inner

    @property
    def stage(self) -> int:
        """This rank's pipeline stage (0 without pipeline parallel)."""
        return self._coord().pipe if self.pp > 1 else 0

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dropout_rank(self) -> int:
        """The rank that keys dropout masks: the same on the ranks of a tensor-parallel group, whose activations
        outside the split matrices are copies of one another."""
        return self.rank // self.tp

    def positions(self, length: int) -> tuple[int, int]:
        """This rank's [start, stop) of a sequence of ``length`` positions (all of it without sequence parallel)."""
        shard = length // self.sp
        return self.sp_rank * shard, (self.sp_rank + 1) * shard

    def describe(self) -> str:
        if self.pp > 1:
            stages = [list(range(s * self.dp, (s + 1) * self.dp)) for s in range(self.pp)]
            pipes = [[s * self.dp + d for s in range(self.pp)] for d in range(self.dp)]
            return (f"{self.world_size} rank(s) = {self.pp} pipeline x {self.dp} data parallel; stages {stages}, "
                    f"pipelines {pipes}")
        if self.ep > 1:
            experts = [list(range(first, first + self.ep)) for first in range(0, self.world_size, self.ep)]
            return (f"{self.world_size} rank(s) = {self.dp} data parallel, experts split {self.ep} ways; "
                    f"expert-parallel groups {experts}")
        groups = [list(range(first, first + self.inner)) for first in range(0, self.world_size, self.inner)]
        axis = "tensor" if self.tp > 1 else "sequence"
        parts = f"; {axis}-parallel groups {groups}" if self.inner > 1 else ""
        return f"{self.world_size} rank(s) = {self.dp} data x {self.tp} tensor x {self.sp} sequence parallel{parts}"


def sequence_loss_scale(topology: Topology, zero_stage: int) -> float:
    """What each rank's mean loss is multiplied by before backward, so that the gradients are those of the mean over
    every position of the global batch. DeepSpeed sums the gradients over all ranks of a sequence-parallel layout;
    at ZeRO 0-2 it divides them by the data-parallel ranks only (``sequence_parallel_size`` in stage 1-2's
    averaging), which would count each of a sequence's sp shard means whole: 1/sp. ZeRO-3's reduce-scatter
    (stage3 ``__avg_scatter_grads``) divides by all dp x sp ranks, which already is the mean: 1. Measured in
    tests/integration/test_parallel.py against one process, gradient norms included."""
    return 1.0 if topology.sp == 1 or zero_stage == 3 else 1.0 / topology.sp


def tensor_parallel_section(model: ModelConfig, tp: int) -> dict[str, Any]:
    """DeepSpeed's ``tensor_parallel`` config for AutoTP training of llmtrain's GPT: the fused q/k/v and the MLP's
    input matrix split by rows of their output (column parallel), each fused piece on its own; the attention and
    MLP output matrices split by columns (row parallel), their partial sums all-reduced. Embeddings, norms and the
    LM head stay whole on every rank: DeepSpeed's vocabulary-parallel head needs its own loss function, and ours
    is the model's cross-entropy over whole logits. (``dtype`` is left out: DeepSpeed's config model refuses a
    string there.)"""
    q, kv = model.n_head * model.head_dim, model.kv_heads * model.head_dim
    qkv_shape = [3, -1] if q == kv else [[q, kv, kv], -1]
    up = {"shape": [2, -1], "partition_dim": 0} if model.mlp == MLP.swiglu else {}
    specs = [
        {"patterns": [r".*\.attn\.qkv\.weight$", r".*\.attn\.qkv\.bias$"], "partition_type": "column",
         "shape": qkv_shape, "partition_dim": 0},
        {"patterns": [r".*\.mlp\.up\.weight$", r".*\.mlp\.up\.bias$"], "partition_type": "column", **up},
        {"patterns": [r".*\.attn\.proj\.weight$", r".*\.mlp\.down\.weight$"], "partition_type": "row"},
    ]
    return {"autotp_size": tp, "vocab_parallel_lm_head": False,
            "partition_config": {"use_default_specs": False, "layer_specs": specs}}


class UlyssesAttention(nn.Module):
    """The model's attention core (whole sequences, (B, T, heads, hs)) inside DeepSpeed's DistributedAttention:
    q, k and v arrive as this rank's T/sp positions of all heads, are exchanged (all-to-all) into all positions of
    nh/sp heads, attended, and exchanged back."""

    def __init__(self, core: nn.Module, group) -> None:
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        # (B, T, heads, hs): scatter the heads (dim 2), gather the positions (dim 1); batch first.
        self.attention = DistributedAttention(core, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        if mask is not None:
            raise ValueError("sequence parallel attention is causal over whole sequences (no KV cache)")
        return self.attention(q, k, v, 0)


class SequenceParallelUnit:
    """DeepSpeed's sequence-parallel groups (``parallel_state_sp``) as the ``mpu`` of ``deepspeed.initialize``,
    whose checkpoints record that no weight is split. ``parallel_state_sp`` names its sequence-parallel group the
    model-parallel one, so DeepSpeed would record tp_degree=sp in every checkpoint (the only use of the tensor-parallel
    world size it asks for first) while writing one model file, and its universal conversion would refuse the
    checkpoint ("model-state file count 1 does not match ... tp_degree=2"). The model-parallel rank and group stay
    the sequence-parallel ones: the bf16 optimizer counts the whole weights' gradients in its norm on rank 0 of the
    group only, then sums over it."""

    def __init__(self, state) -> None:
        self.state = state

    def __getattr__(self, name: str):
        return getattr(self.state, name)

    @staticmethod
    def get_tensor_model_parallel_world_size() -> int:
        return 1


def sequence_parallel_groups(sp: int) -> SequenceParallelUnit:
    """Create DeepSpeed's sequence-parallel groups (consecutive ranks) and return the ``mpu`` that
    ``deepspeed.initialize`` must get: without it DeepSpeed reduces gradients over the data-parallel ranks only and
    the ranks of a sequence-parallel group drift apart without an error."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(sp)
    return SequenceParallelUnit(parallel_state_sp)


def apply_sequence_parallel(model: nn.Module, mpu) -> None:
    """Put every attention core of ``model`` inside a Ulysses all-to-all over the sequence-parallel group."""
    group = mpu.get_sequence_parallel_group()
    for module in list(model.modules()):
        core = getattr(module, "core", None)
        if core is not None and not isinstance(core, UlyssesAttention):
            module.core = UlyssesAttention(core, group)


def parallelize(model: nn.Module, topology: Topology) -> Any:
    """Apply the sequence-parallel part of the layout to ``model`` (the tensor-parallel part is DeepSpeed's, from
    the ``tensor_parallel`` section, at initialize); the ``mpu`` to hand to ``deepspeed.initialize``, or None."""
    if topology.sp == 1:
        return None
    mpu = sequence_parallel_groups(topology.sp)
    apply_sequence_parallel(model, mpu)
    return mpu
