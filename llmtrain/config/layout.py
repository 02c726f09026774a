"""The distributed layout: ``mode`` (how ranks train together) and ``dist.*`` (data parallel under ZeRO, tensor and
sequence parallel), with the rules a parallel degree must meet against the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from llmtrain.config.checks import MAX_TIMEOUT_S, bounded, raise_problems
from llmtrain.config.model import Arch, ModelConfig


class Mode(str, Enum):
    """How ranks train together: synchronous DeepSpeed ZeRO, or asynchronous SGD through parameter servers."""

    sync = "sync"
    async_ps = "async_ps"

PIPELINE_SCHEDULES = ("1f1b", "dualpipev")
"""How micro-batches move through the stages: 1F1B (PipeDream-Flush: each rank one stage, one forward then one
backward in turn) or DualPipeV (DeepSeek: each rank two stages, out and back in a V, the loss on rank 0)."""


@dataclass(kw_only=True)
class DistConfig:
    """Data parallelism under DeepSpeed ZeRO, pipeline stages, and tensor or sequence parallelism:
    world = pp x dp x tp x sp."""

    zero_stage: int = 0
    """ZeRO stage: 0 (plain data parallel) | 1 (optimizer states sharded) | 2 (+ gradients) | 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the update) on the CPU; needs zero_stage >= 1."""
    offload_params: bool = False
    """Keep parameters on the CPU; needs zero_stage = 3."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (memory for compute)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, gloo otherwise) | nccl | gloo."""
    timeout_s: int = 600
    """Collective timeout: a lost rank ends the job after this many seconds instead of hanging."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Merged over the generated DeepSpeed config: +dist.deepspeed_overrides.zero_optimization.overlap_comm=true."""
    tensor_parallel: int = 1
    """Ranks that split each attention and MLP matrix (DeepSpeed AutoTP); with ZeRO 0-2 on the data-parallel rest."""
    sequence_parallel: int = 1
    """Ranks that split every sequence, T / N positions each, exchanging heads around attention (DeepSpeed
    Ulysses); with ZeRO 0-3."""
    pipeline_parallel: int = 1
    """Pipeline stages: consecutive blocks on N ranks, micro-batches streamed through them (DeepSpeed's pipeline
    engine, 1F1B schedule); the outermost axis, so stages may span nodes. With ZeRO 0-1 on the data-parallel rest."""
    expert_parallel: int = 1
    """Ranks that split each mixture-of-experts layer's experts, n_experts / N each (the classic DeepSpeed MoE
    layer's ep_size, with its all-to-all exchange; not DeepSpeed's AutoEP section). Every rank stays data parallel
    and reads its own data; each expert is replicated over dp / N ranks. With ZeRO 0-2."""
    pipeline_schedule: str = "1f1b"
    """1f1b | dualpipev (each rank holds 2 of 2N pieces; needs at least 2N micro-batches per step)."""
    pipeline_partition: str = "type:Block"
    """How blocks are cut into stages, by DeepSpeed's partition methods: type:Block (equal blocks per stage) |
    parameters (equal parameter counts; the tied embedding counts on the first and last stage) | uniform (equal
    layer counts, embeddings and head included)."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded("dist.tensor_parallel", self.tensor_parallel, 1, 1 << 16)
        problems += bounded("dist.sequence_parallel", self.sequence_parallel, 1, 1 << 16)
        problems += bounded("dist.pipeline_parallel", self.pipeline_parallel, 1, 1 << 16)
        problems += bounded("dist.expert_parallel", self.expert_parallel, 1, 1 << 16)
        if self.expert_parallel > 1:
            ep = f"dist.expert_parallel={self.expert_parallel}"
            if self.zero_stage == 3:
                problems.append(f"{ep} combines with dist.zero_stage=0|1|2: DeepSpeed's MoE layer refuses ZeRO-3")
            for axis in ("pipeline_parallel", "tensor_parallel", "sequence_parallel"):
                if getattr(self, axis) > 1:
                    problems.append(f"{ep} with dist.{axis}={getattr(self, axis)} does not combine yet: experts "
                                    "split over data-parallel ranks only")
        if self.pipeline_parallel > 1:
            if self.zero_stage > 1:
                problems.append(f"dist.pipeline_parallel={self.pipeline_parallel} combines with dist.zero_stage=0|1: "
                                "DeepSpeed's pipeline engine refuses ZeRO-2 and ZeRO-3 (they reduce gradients "
                                "inside backward, which the pipeline schedules itself)")
            if self.tensor_parallel > 1:
                problems.append(f"dist.pipeline_parallel={self.pipeline_parallel} with dist.tensor_parallel="
                                f"{self.tensor_parallel}: DeepSpeed 0.19's AutoTP cannot split a pipeline module's "
                                "stages (tests/integration/pipeline_tp_repro.py reproduces it); use one of them")
            if self.sequence_parallel > 1:
                problems.append(f"dist.pipeline_parallel={self.pipeline_parallel} with dist.sequence_parallel="
                                f"{self.sequence_parallel} does not combine yet: use one of them")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            problems.append(f"dist.pipeline_schedule={self.pipeline_schedule} must be 1f1b or dualpipev")
        if not (self.pipeline_partition in ("parameters", "uniform") or self.pipeline_partition.startswith("type:")):
            problems.append(f"dist.pipeline_partition={self.pipeline_partition} must be type:<layer class regex>, "
                            "parameters or uniform (DeepSpeed's partition methods)")
        if self.tensor_parallel > 1 and self.sequence_parallel > 1:
            problems.append("dist.tensor_parallel and dist.sequence_parallel do not combine yet: use one of them")
        if self.tensor_parallel > 1 and self.zero_stage == 3:
            problems.append("dist.tensor_parallel>1 combines with dist.zero_stage=0|1|2 (ZeRO-3 already splits the "
                            "weights; use it or dist.sequence_parallel)")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"dist.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage < 1:
            problems.append("dist.offload_optimizer=true needs dist.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            problems.append("dist.offload_params=true needs dist.zero_stage=3")
        if self.backend not in ("auto", "nccl", "gloo"):
            problems.append(f"dist.backend={self.backend} must be auto, nccl or gloo")
        problems += bounded("dist.timeout_s", self.timeout_s, 1, MAX_TIMEOUT_S)
        raise_problems(problems, "dist")

def parallel_problems(model: ModelConfig, dist: DistConfig, mode: Mode = Mode.sync) -> list[str]:
    """What a tensor- or sequence-parallel degree must divide, and where it does not apply (one line each). Checked
    with the config, and again on a model.init_from model, whose sizes come from its folder."""
    problems = []
    if dist.pipeline_parallel > 1:
        pp = dist.pipeline_parallel
        if mode == Mode.async_ps:
            problems.append(f"dist.pipeline_parallel={pp} applies to mode=sync; the parameter servers' workers each "
                            "hold the whole model")
        elif model.arch != Arch.gpt:
            problems.append(f"dist.pipeline_parallel={pp} cuts the Transformer's blocks into stages; "
                            f"model.arch={model.arch.value} trains data parallel only")
        else:
            pieces = pp * (2 if dist.pipeline_schedule == "dualpipev" else 1)
            if model.n_layer < pieces:
                what = f"{pieces} DualPipeV pieces" if pieces > pp else "stage"
                problems.append(f"dist.pipeline_parallel={pp} needs a block on every {what}; model.n_layer="
                                f"{model.n_layer} has fewer")
    if dist.expert_parallel > 1:
        ep = dist.expert_parallel
        if mode == Mode.async_ps:
            problems.append(f"dist.expert_parallel={ep} applies to mode=sync; the parameter servers' workers each "
                            "hold the whole model")
        elif model.n_experts == 0:
            problems.append(f"dist.expert_parallel={ep} splits a mixture of experts: set model.n_experts")
        elif model.n_experts % ep:
            problems.append(f"dist.expert_parallel={ep} does not divide model.n_experts={model.n_experts}: each "
                            "rank takes an equal share of the experts")
    if model.n_experts and mode == Mode.async_ps:
        problems.append(f"model.n_experts={model.n_experts} trains with mode=sync; the parameter-server mode trains "
                        "dense models")
    if model.n_experts and dist.pipeline_parallel > 1:
        problems.append(f"model.n_experts={model.n_experts} with dist.pipeline_parallel={dist.pipeline_parallel} "
                        "does not combine yet: the router losses of earlier stages would have to reach the loss")
    if model.n_experts and dist.sequence_parallel > 1:
        problems.append(f"model.n_experts={model.n_experts} with dist.sequence_parallel={dist.sequence_parallel} does "
                        "not combine yet: the router's losses would be per slice of a sequence")
    if model.n_experts and dist.tensor_parallel > 1:
        problems.append(f"model.n_experts={model.n_experts} with dist.tensor_parallel={dist.tensor_parallel} does not "
                        "combine: AutoTP would replicate the experts, not split them")
    for axis, degree in (("tensor_parallel", dist.tensor_parallel), ("sequence_parallel", dist.sequence_parallel)):
        if degree == 1:
            continue
        if mode == Mode.async_ps:
            problems.append(f"dist.{axis}={degree} applies to mode=sync; the parameter servers' workers each hold "
                            "the whole model")
        if model.arch != Arch.gpt:
            problems.append(f"dist.{axis}={degree} splits the Transformer's layers; model.arch={model.arch.value} "
                            "trains data parallel only")
            continue
        heads = [("model.n_head", model.n_head)] + ([("model.n_kv_head", model.kv_heads)]
                                                    if model.kv_heads != model.n_head else [])
        for name, size in heads:
            if size % degree:
                problems.append(f"dist.{axis}={degree} does not divide {name}={size}: each rank takes whole heads")
        if axis == "tensor_parallel" and model.hidden % degree:
            problems.append(f"dist.tensor_parallel={degree} does not divide the MLP width {model.hidden}")
        if axis == "sequence_parallel" and model.block_size % degree:
            problems.append(f"dist.sequence_parallel={degree} does not divide model.block_size={model.block_size}: "
                            "each rank takes an equal slice of every sequence")
    return problems
