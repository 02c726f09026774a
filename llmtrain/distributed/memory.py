"""Know before you launch: the memory a rank will hold, predicted from the config, and what would make it fit.

Model states per rank follow the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3), with the bytes
DeepSpeed really keeps per parameter: the weights (4 bytes fp32, 2 bf16/fp16), their gradients, and the optimizer's
fp32 state -- Adam's two moments (8 bytes) plus, with mixed precision or at ZeRO-1/2, an fp32 master copy (4 bytes;
ZeRO-1/2 clone it even in fp32, ZeRO-3 in fp32 steps the partition itself). Stage 1 splits the optimizer state over
the data-parallel ranks, stage 2 the gradients too, stage 3 the weights too. Besides them: Adam's temporary, the
communication buckets (sized from the model width, see ``deepspeed.buckets_for_width``; at stage 0 one all-reduce
copy of all the gradients), stage 3's gathered working set (two layers and the embedding), the activations of one
micro-batch (Korthikanti et al. 2022: 34·b·t·h + 5·a·b·t² per layer at 2 bytes), the logits, the host copy of this
rank's part of a checkpoint that a background save keeps (train.checkpoint_async: rank 0's weights below ZeRO-3, and
the rank's fp32 master and moments), and the process itself (PyTorch and DeepSpeed loaded: measured, not
predicted).
What the prediction cannot know is the allocator's fragmentation (see ``llmtrain.allocator``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmtrain.config import Precision, TrainConfig
from llmtrain.distributed.deepspeed import buckets_for_width
from llmtrain.optim import ChunkedAdamW

GB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank is predicted to hold at its peak, by kind."""

    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    process: float
    checkpoint_copy: float = 0.0

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations + self.process + self.checkpoint_copy

    def describe(self) -> str:
        return (f"{self.total / GB:.2f} GB = model states {self.model_states / GB:.2f} (weights "
                f"{self.weights / GB:.2f}, gradients {self.gradients / GB:.2f}, optimizer {self.optimizer / GB:.2f})"
                f" + buffers {self.buffers / GB:.2f} + activations {self.activations / GB:.2f}"
                + (f" + checkpoint copy {self.checkpoint_copy / GB:.2f}" if self.checkpoint_copy else "")
                + f" + process {self.process / GB:.2f}")


def estimate(cfg: TrainConfig, num_params: int, world: int, process_bytes: float,
             on_gpu: bool = False) -> MemoryEstimate:
    """The peak bytes per rank of ``cfg`` with ``num_params`` parameters (all of them, embeddings included) on
    ``world`` data-parallel ranks; ``process_bytes`` is what the process holds before the model (its baseline)."""
    stage, n, psi, m = cfg.dist.zero_stage, world, float(num_params), cfg.model
    mixed = cfg.precision != Precision.fp32
    weight_bytes = 2 if mixed else 4
    grad_bytes = 4 if (mixed and stage == 0) else weight_bytes  # bf16 ZeRO-0 accumulates in fp32
    optim_bytes = 8 + (4 if (mixed or stage in (1, 2)) else 0)  # see llmtrain.workarounds.FP32_MASTER
    weights = weight_bytes * psi / (n if stage == 3 else 1)
    gradients = grad_bytes * psi / (n if stage >= 2 else 1)
    optimizer = optim_bytes * psi / (n if stage >= 1 else 1)
    if on_gpu and cfg.dist.offload_optimizer:  # the fp32 state lives in host memory
        optimizer = 0.0
    if on_gpu and cfg.dist.offload_params:
        weights = 0.0
    h, layer_params = m.n_embd, 12 * m.n_embd**2
    # Adam's update: PyTorch's fused AdamW (GPU) makes no temporary, ChunkedAdamW (CPU) one chunk's worth.
    buffers = 0.0 if on_gpu else 4.0 * ChunkedAdamW.CHUNK
    if stage == 0:  # DeepSpeed flattens all gradients into one all-reduce bucket (up to 5e8 elements) -- even on 1 rank
        buffers += grad_bytes * min(psi, 5e8)
    buckets = buckets_for_width(h, stage) if stage >= 1 else {}
    if stage in (1, 2):
        buffers += (buckets["reduce_bucket_size"] + buckets["allgather_bucket_size"]) * 4
    elif stage == 3:  # buckets, and two layers plus the embedding table gathered whole while they compute
        buffers += (buckets["reduce_bucket_size"] + buckets["stage3_prefetch_bucket_size"]) * 4
        buffers += (2 * layer_params + m.vocab_size * h) * weight_bytes
    b, t, a, layers = cfg.train.micro_batch_size, m.block_size, m.n_head, m.n_layer
    act_bytes = 2 if mixed else 4
    per_layer = (34 * b * t * h + 5 * a * b * t * t) * act_bytes / 2
    if cfg.dist.activation_checkpointing:
        activations = layers * b * t * h * act_bytes + per_layer
    else:
        activations = layers * per_layer
    activations += 3 * b * t * m.vocab_size * 4  # logits, their softmax and its gradient, in fp32
    return MemoryEstimate(weights, gradients, optimizer, buffers, activations, process_bytes,
                          checkpoint_copy(cfg, psi, n) if cfg.train.checkpoint_async else 0.0)


def checkpoint_copy(cfg: TrainConfig, psi: float, world: int) -> float:
    """Bytes of rank 0's part of a checkpoint (what a background save keeps a host copy of): the module's weights
    below ZeRO-3 (rank 0 writes them), and the optimizer's fp32 master and two moments -- rank 0's partition, or at
    ZeRO-0 in fp32 the torch optimizer's whole state (its moments; the weights are the module's)."""
    stage, mixed = cfg.dist.zero_stage, cfg.precision != Precision.fp32
    module = (2 if mixed else 4) * psi if stage < 3 else 0.0
    return module + (8 * psi if stage == 0 and not mixed else 12 * psi / world)


def process_rss() -> float:
    """Bytes this process holds now (resident set size)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return float(line.split()[1]) * 1024


def visible_bytes(device: torch.device, local_world: int) -> float:
    """Memory one rank may use: its GPU's, or on a CPU host its share of what is available plus what it already
    holds (all local ranks are about to grow alike)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    return available / max(1, local_world) + process_rss()


def what_would_fit(cfg: TrainConfig, num_params: int, world: int, process_bytes: float, visible: float,
                   on_gpu: bool) -> list[str]:
    """The single changes of the settings that bring the prediction under ``visible``, each with its prediction;
    when none does alone, the shortest run of them, taken in this order, that does (more ranks last)."""
    dist_, train = cfg.dist, cfg.train
    changes: list[tuple[str, Callable[[TrainConfig], TrainConfig]]] = []
    if dist_.zero_stage < 3:
        changes.append(("dist.zero_stage=3", lambda c: _with(c, dist=dataclasses.replace(c.dist, zero_stage=3))))
    if not dist_.activation_checkpointing:
        changes.append(("dist.activation_checkpointing=true",
                        lambda c: _with(c, dist=dataclasses.replace(c.dist, activation_checkpointing=True))))
    if train.micro_batch_size > 1:
        changes.append(("train.micro_batch_size=1",
                        lambda c: _with(c, train=dataclasses.replace(c.train, micro_batch_size=1))))
    if train.checkpoint_async:
        changes.append(("train.checkpoint_async=false",
                        lambda c: _with(c, train=dataclasses.replace(c.train, checkpoint_async=False))))
    if on_gpu and not dist_.offload_optimizer:
        changes.append(("dist.offload_optimizer=true", lambda c: _with(c, dist=dataclasses.replace(
            c.dist, zero_stage=max(1, c.dist.zero_stage), offload_optimizer=True))))

    def predicted(changed: TrainConfig, ranks: int) -> float:
        return estimate(changed, num_params, ranks, process_bytes, on_gpu).total

    singles = [(name, predicted(change(cfg), world)) for name, change in changes]
    if cfg.dist.zero_stage >= 1:
        singles.append((f"{2 * world} ranks", predicted(cfg, 2 * world)))
    found = [f"{name} ({need / GB:.1f} GB)" for name, need in singles if need <= visible]
    if found:
        return found
    names, changed = [], cfg
    for name, change in changes:
        names.append(name)
        changed = change(changed)
        if predicted(changed, world) <= visible:
            return [f"{' '.join(names)} ({predicted(changed, world) / GB:.1f} GB)"]
    ranks = world
    while ranks < 1 << 16 and changed.dist.zero_stage >= 1:
        ranks *= 2
        if predicted(changed, ranks) <= visible:
            return [f"{' '.join(names)} on {ranks} ranks ({predicted(changed, ranks) / GB:.1f} GB)"]
    return []


def _with(cfg: TrainConfig, **sections) -> TrainConfig:
    return dataclasses.replace(cfg, **sections)
