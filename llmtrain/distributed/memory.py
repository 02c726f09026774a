"""Know before you launch: the memory a rank will hold, predicted from the config, and what would make it fit.

Model states per rank follow the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3), with the bytes
DeepSpeed really keeps per parameter: the weights (4 bytes fp32, 2 bf16/fp16), their gradients, and the optimizer's
fp32 state -- Adam's two moments (8 bytes) plus, with mixed precision or at ZeRO-1/2, an fp32 master copy (4 bytes;
ZeRO-1/2 clone it even in fp32, ZeRO-3 in fp32 steps the partition itself). Stage 1 splits the optimizer state over
the data-parallel ranks, stage 2 the gradients too, stage 3 the weights too. Tensor parallel (``dist.tensor_parallel``)
splits each block's attention and MLP matrices over its ranks first; ZeRO then splits over the data-parallel ranks
(world / tp). Pipeline parallel (``dist.pipeline_parallel``) gives each stage its layers (the tied token table on the
first and the last stage) and its first stage the activations of up to pp micro-batches in flight (1F1B); ZeRO then
splits over the data-parallel ranks (world / pp). Expert parallel (``dist.expert_parallel``) gives each rank 1/ep of
every mixture-of-experts layer's experts, which ZeRO splits over their expert-data-parallel group (dp / ep ranks);
a sparse layer's MLP activations are those of its k routed experts and shared ones. Under sequence parallel
(``dist.sequence_parallel``) every rank holds the whole model and ZeRO splits over all the ranks. Besides them:
Adam's temporary, the communication buckets (sized from the model width, see ``deepspeed.buckets_for_width``; at
stage 0 one all-reduce copy of all the gradients), stage 3's gathered working set
(two layers and the embedding) and its optimizer step's flat copy of one sub-group's gradients, the activations of one
micro-batch (Korthikanti et al. 2022, per layer at 2 bytes: 34·b·t·h + 5·a·b·t², with tensor parallel 10·b·t·h +
24·b·t·h/tp + 5·a·b·t²/tp; sequence parallel holds t/sp positions everywhere but attention, which sees all t positions
of a/sp heads; the attention scores only where a kernel keeps them, see ``attention_score_bytes``), the logits, the
host copies of this rank's part of a checkpoint that background saves keep (train.checkpoint_async: of rank 0's
weights below ZeRO-3 and of the rank's fp32 master and moments, the files that fit in train.checkpoint_buffer_gb, see
``checkpoint_copy``), and the process itself (PyTorch and DeepSpeed's engine loaded: measured, not
predicted, ``process_baseline``).
What the prediction cannot know is the allocator's fragmentation (see ``llmtrain.allocator``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmtrain.config import AUTO, MLP, ModelConfig, OptimizerName, Precision, TrainConfig
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
             on_gpu: bool = False, model: ModelConfig | None = None) -> MemoryEstimate:
    """The peak bytes per rank of ``cfg`` with ``num_params`` parameters (all of them, embeddings included) on
    ``world`` ranks, laid out as ``cfg.dist`` says (world = pp x dp x tp x sp; a pipeline rank holds its stage's
    layers, ``stage_params``, the largest stage counted, of ``model``: the model as it runs, its vocabulary from the
    data, when given); ``process_bytes`` is what the process holds before the model (its baseline)."""
    stage, m, pp, ep = cfg.dist.zero_stage, cfg.model, cfg.dist.pipeline_parallel, cfg.dist.expert_parallel
    n = max(1, world // (cfg.dist.tensor_parallel * pp))  # the ranks ZeRO partitions over: dp, or dp x sp
    psi = rank_params(m, float(num_params), cfg.dist.tensor_parallel)
    if pp > 1:  # the largest stage's layers
        psi = max(stage_params(model or m, pp, cfg.dist.pipeline_partition))
    # Expert parallel: a rank holds 1/ep of the experts, which ZeRO partitions over their expert-data-parallel group
    # (n / ep ranks), the rest over all n.
    experts = min(psi, float(expert_params(model or m)))
    parts = [(psi - experts, n), (experts / ep, max(1, n // ep))]
    mixed = cfg.precision != Precision.fp32
    weight_bytes = 2 if mixed else 4
    grad_bytes = 4 if (mixed and stage == 0) else weight_bytes  # bf16 ZeRO-0 accumulates in fp32
    optim_bytes = 8 + (4 if (mixed or stage in (1, 2)) else 0)  # see llmtrain.workarounds.FP32_MASTER
    weights = sum(weight_bytes * p / (d if stage == 3 else 1) for p, d in parts)
    gradients = sum(grad_bytes * p / (d if stage >= 2 else 1) for p, d in parts)
    optimizer = sum(optim_bytes * p / (d if stage >= 1 else 1) for p, d in parts)
    psi = sum(p for p, _ in parts)  # held by this rank before ZeRO
    if on_gpu and cfg.dist.offload_optimizer:  # the fp32 state lives in host memory
        optimizer = 0.0
    if on_gpu and cfg.dist.offload_params:
        weights = 0.0
    h = m.n_embd
    # Adam's update: PyTorch's fused AdamW (GPU) makes no temporary, ChunkedAdamW (CPU) one chunk's worth.
    buffers = 0.0 if on_gpu else 4.0 * ChunkedAdamW.CHUNK
    if stage == 0:  # DeepSpeed flattens all gradients into one all-reduce bucket (up to 5e8 elements) -- even on 1 rank
        buffers += grad_bytes * min(psi, 5e8)
    buckets = buckets_for_width(h, stage) if stage >= 1 else {}
    if stage in (1, 2):
        buffers += (buckets["reduce_bucket_size"] + buckets["allgather_bucket_size"]) * 4
    elif stage == 3:  # buckets, two layers plus the embedding table gathered whole while they compute, and the
        # optimizer step's flat fp32 copy of one sub-group's gradients (DeepSpeed's _prepare_fp32_grad_for_sub_group)
        buffers += (buckets["reduce_bucket_size"] + buckets["stage3_prefetch_bucket_size"]) * 4
        buffers += (2 * block_matrix_params(m) + m.vocab_size * h) * weight_bytes
        buffers += (4 + (weight_bytes if mixed else 0)) * min(buckets["sub_group_size"], psi / n)
    micro_batches = max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * n))
    return MemoryEstimate(weights, gradients, optimizer, buffers, activation_bytes(cfg, on_gpu, micro_batches),
                          process_bytes,
                          checkpoint_copy(cfg, psi, n) if cfg.train.background_saves else 0.0)


def server_bytes(cfg: TrainConfig, shard_params: float, num_workers: int,
                 model_params: float = 0.0) -> dict[str, float]:
    """What one parameter server (mode=async_ps) holds for a shard of ``shard_params`` parameters, by part: its fp32
    master weights; the optimizer state (Downpour: the ``optim.*`` optimizer's, AdamW's two fp32 moments or SGD's
    momentum; DiLoCo: the outer fp32 momentum buffer, and Delayed Nesterov's pseudo-gradient sum); in DiLoCo's sync
    rounds the round's pseudo-gradients until it closes (one fp32 copy per worker); on server 0 under DiLoCo
    (``model_params``: the whole model's) every worker's inner optimizer state, kept for the checkpoints; and a
    checkpoint's host copy of all that but the round when saves run in the background."""
    psi = float(shard_params)
    optim_state = 8.0 if cfg.optim.name != OptimizerName.sgd else (4.0 if cfg.optim.momentum else 0.0)
    diloco = cfg.ps.diloco
    parts = {"weights": 4 * psi,
             "optimizer": 4 * psi * (1 if cfg.ps.sync_rounds else 2) if diloco else optim_state * psi,
             "round": 4 * psi * num_workers if diloco and cfg.ps.sync_rounds else 0.0,
             "inner states": optim_state * float(model_params) * num_workers if diloco else 0.0}
    kept = parts["weights"] + parts["optimizer"] + parts["inner states"]
    parts["checkpoint copy"] = kept if cfg.train.background_saves else 0.0
    return parts


def block_matrix_params(model: ModelConfig) -> int:
    """Parameters of one block's matrices that tensor parallel splits: the fused q/k/v (grouped-query shapes
    included), the attention output, the MLP's input (twice as wide with swiglu) and output, and the biases of
    the column-split ones (the row-split ones' biases stay whole, see ``parallel.tensor_parallel_section``)."""
    h, hidden = model.n_embd, model.hidden
    qkv = (model.n_head + 2 * model.kv_heads) * model.head_dim
    up = hidden * (2 if model.mlp == MLP.swiglu else 1)
    return qkv * h + h * h + up * h + hidden * h + ((qkv + up) if model.bias else 0)


def expert_params(model: ModelConfig) -> int:
    """Parameters of the routed experts of every mixture-of-experts layer (0 for a dense model)."""
    if not model.n_experts:
        return 0
    h, width = model.n_embd, model.expert_hidden
    one = h * width * (3 if model.mlp == MLP.swiglu else 2) + ((width * (2 if model.mlp == MLP.swiglu else 1) + h)
                                                                if model.bias else 0)
    return len(model.sparse_layers) * model.n_experts * one


def layer_params(model: ModelConfig) -> list[int]:
    """Parameters of each layer of the model's pipeline form (``pipeline.layer_specs``): the token table, the
    position table, the blocks, the final norm, the head (the tied token table again, counted on its stage)."""
    from llmtrain.model import build_model

    with torch.device("meta"):
        gpt = build_model(dataclasses.replace(model, vocab_size=max(model.vocab_size, 1)))
    count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
    head = gpt.wte.weight.numel() if model.tie_embeddings else gpt.lm_head.weight.numel()
    return [gpt.wte.weight.numel(), count(gpt.wpe), *(count(b) for b in gpt.blocks), count(gpt.norm_f), head]


def stage_params(model: ModelConfig, pp: int, partition: str) -> list[int]:
    """Parameters each of ``pp`` pipeline stages holds, cut as DeepSpeed's pipeline module cuts them
    (``dist.pipeline_partition``: its own partition functions, over the layers of ``layer_params``)."""
    from deepspeed.runtime import utils as ds_utils

    counts = layer_params(model)
    if partition == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(counts), num_parts=pp)
    elif partition == "parameters":
        parts = ds_utils.partition_balanced(weights=counts, num_parts=pp)
    else:  # type:<the block class>: the blocks balanced
        blocks = [1 if 2 <= i < 2 + model.n_layer else 0 for i in range(len(counts))]
        parts = ds_utils.partition_balanced(weights=blocks, num_parts=pp)
    return [sum(counts[parts[s]:parts[s + 1]]) for s in range(pp)]


def rank_params(model: ModelConfig, num_params: float, tp: int) -> float:
    """Parameters one rank holds before ZeRO partitions them: all ``num_params``, except the split matrices of
    every block (``block_matrix_params``), of which a tensor-parallel rank holds 1/tp."""
    if tp == 1:
        return num_params
    split = min(num_params, float(model.n_layer * block_matrix_params(model)))
    return num_params - split + split / tp


def activation_bytes(cfg: TrainConfig, on_gpu: bool, micro_batches: int = 1) -> float:
    """One micro-batch's activations on one rank at their peak, with the logits. Korthikanti et al. 2022 count
    per layer, at 2 bytes, 34·b·t·h + 5·a·b·t² (the attention scores); with tensor parallel the norms' and dropouts'
    part (10·b·t·h) stays whole on every rank and the rest (24·b·t·h and the scores) is split. A sequence-parallel
    rank holds t/sp positions everywhere but inside attention, where it has all t positions of a/sp heads. With
    activation checkpointing only each block's input stays (whole under tensor parallel), plus one block recomputed.
    ``micro_batches``: per step on a rank (a pipeline's first stage holds several in flight)."""
    m, tp, sp, pp = cfg.model, cfg.dist.tensor_parallel, cfg.dist.sequence_parallel, cfg.dist.pipeline_parallel
    b, t, h, layers = cfg.train.micro_batch_size, m.block_size, m.n_embd, m.n_layer
    act_bytes = 2 if cfg.precision != Precision.fp32 else 4
    positions = t / sp  # this rank's positions outside attention
    per_layer = (10 + 24 / tp) * b * positions * h * act_bytes / 2
    if m.n_experts:  # the MLP's 19·b·t·h (at 4h wide) for k experts and the shared ones, plus the routed copies
        width = (m.experts_per_token + m.n_shared_experts) * m.expert_hidden
        sparse = (19 * width / (4 * h) + 2 * m.experts_per_token) * b * positions * h * act_bytes / 2
        per_layer += (sparse - 19 * b * positions * h * act_bytes / 2) * len(m.sparse_layers) / layers
    per_layer += attention_score_bytes(cfg, m.n_head / (tp * sp), on_gpu)
    logits = 3 * b * positions * m.vocab_size * 4
    if pp > 1:
        # 1F1B: the first stage holds the activations of min(pp, micro-batches) micro-batches in flight, the last
        # stage one micro-batch's and the logits; each of about n_layer / pp blocks (the largest stage's).
        layers = -(-layers // pp)
        in_flight = min(pp, micro_batches)
        one = (layers * b * positions * h * act_bytes + per_layer if cfg.dist.activation_checkpointing
               else layers * per_layer)
        return max(in_flight * one, one + logits)
    if cfg.dist.activation_checkpointing:
        activations = layers * b * positions * h * act_bytes + per_layer
    else:
        activations = layers * per_layer
    # The LM head is whole on every tensor-parallel rank: the logits of all this rank's positions, their softmax and
    # its gradient, in fp32.
    return activations + logits


def attention_score_bytes(cfg: TrainConfig, heads: float, on_gpu: bool) -> float:
    """The t x t attention scores of ``heads`` heads that one layer keeps, where a kernel keeps them.

    On a CPU, PyTorch 2.13's ``scaled_dot_product_attention`` takes its flash kernel for causal attention without
    dropout and never holds the scores: measured for 6 heads of 64 at t=4096 in fp32, forward and backward raise the
    peak by 37 MiB, where one score matrix is 384 MiB (t=8192: 67 MiB against 1.5 GiB), so the term is 0. With
    dropout it takes the math kernel, which works in fp32 even for bf16 inputs: measured 16.5 bytes per score at
    its peak in backward, fp32 and bf16 alike (13-15 in forward). On a GPU the term stays Korthikanti's
    5·a·b·t² at 2 bytes (not measured here: PyTorch's fused CUDA kernels, where they apply, would keep less)."""
    m, b, t = cfg.model, cfg.train.micro_batch_size, cfg.model.block_size
    if on_gpu:
        return 5 * heads * b * t * t * (2 if cfg.precision != Precision.fp32 else 4) / 2
    return 16.5 * heads * b * t * t if m.dropout > 0 else 0.0


def checkpoint_copy(cfg: TrainConfig, psi: float, world: int) -> float:
    """Bytes of host copies a background save keeps on rank 0: of its files -- the module's weights below ZeRO-3
    (rank 0 writes them) and the optimizer's fp32 master and two moments (rank 0's partition, or at ZeRO-0 in fp32
    the torch optimizer's whole state: its moments; the weights are the module's), one file at ZeRO-0 and two above
    -- the largest that fit in train.checkpoint_buffer_gb (``choose_copies``). ``psi``: the parameters
    this rank holds before ZeRO (``rank_params``); ``world``: the ranks ZeRO partitions over."""
    stage, mixed = cfg.dist.zero_stage, cfg.precision != Precision.fp32
    module = (2 if mixed else 4) * psi if stage < 3 else 0.0
    optimizer = 8 * psi if stage == 0 and not mixed else 12 * psi / world
    files = [module + optimizer] if stage == 0 else [module, optimizer]
    chosen = choose_copies([int(f) for f in files], cfg.train.buffer_bytes)
    return sum(size for size, copied in zip(files, chosen, strict=True) if copied)


def only_direct_saves_fit(cfg: TrainConfig, predicted: MemoryEstimate, visible: float) -> bool:
    """train.checkpoint_async=auto's verdict on one rank: ``predicted`` fits in ``visible`` only without the host
    copies of background saves (then the run saves synchronously)."""
    direct = predicted.total - predicted.checkpoint_copy
    return cfg.train.checkpoint_async == AUTO and predicted.total > visible >= direct


def choose_copies(sizes: list[int], budget: float | None) -> list[bool]:
    """Which of a background save's files (of ``sizes`` bytes) a rank copies to host memory within ``budget`` bytes
    (train.checkpoint_buffer_gb; None: all of them): the largest that fit first, so that the least is left live."""
    if budget is None:
        return [True] * len(sizes)
    chosen, left = [False] * len(sizes), budget
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[index] <= left:
            chosen[index], left = True, left - sizes[index]
    return chosen


def process_baseline() -> float:
    """Bytes the process holds before the model (``process_rss``), counting DeepSpeed's engine, which every run
    imports as it starts (imported here a moment before it would be anyway)."""
    import deepspeed.runtime.engine  # noqa: F401

    return process_rss()


def process_rss() -> float:
    """Bytes this process holds now (resident set size)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return float(line.split()[1]) * 1024


def visible_bytes(device: torch.device, local_world: int) -> float:
    """Memory one rank may use: its GPU's, or on a CPU host its share of what is available (to its memory cgroup,
    where that limits it) plus what it already holds (all local ranks are about to grow alike)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    room = cgroup_room(Path("/proc/self/cgroup").read_text(), Path("/sys/fs/cgroup"))
    return min(available, room if room is not None else available) / max(1, local_world) + process_rss()


@dataclass(frozen=True)
class MemoryCgroup:
    """The memory cgroup a process is in, in one hierarchy: cgroup v2 (``0::/path``) or v1's ``memory`` one."""

    base: Path  # the hierarchy's root folder
    folder: Path  # the process's own cgroup in it
    v2: bool

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.v2 else "memory.limit_in_bytes"

    @property
    def swap_limit_file(self) -> str:
        return "memory.swap.max" if self.v2 else "memory.memsw.limit_in_bytes"

    def lineage(self) -> list[Path]:
        """Its folder and every cgroup folder above it, up to the hierarchy's root."""
        folders = [self.folder]
        while folders[-1] != self.base and self.base in folders[-1].parents:
            folders.append(folders[-1].parent)
        return folders


def memory_cgroups(membership: str, root: Path) -> list[MemoryCgroup]:
    """The memory cgroups of a process whose /proc/<pid>/cgroup reads ``membership``, under ``root``
    (/sys/fs/cgroup): the v2 one and v1's ``memory`` hierarchy's, where they are."""
    found = []
    for line in membership.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            found.append(MemoryCgroup(root, root / path.lstrip("/"), v2=True))
        elif "memory" in controllers.split(","):
            found.append(MemoryCgroup(root / "memory", root / "memory" / path.lstrip("/"), v2=False))
    return found


def cgroup_room(membership: str, root: Path) -> float | None:
    """Bytes the memory cgroup of this process (``membership``: /proc/self/cgroup's text) and every cgroup above it
    can still take before its limit -- the least of them, its inactive page cache counted as free -- or None where
    none is limited. A scheduler or container limits a job's memory this way (Slurm's task/cgroup plugin, Docker,
    Kubernetes) while /proc/meminfo shows the whole machine's. cgroup v2 (``0::/path``, files memory.max /
    memory.current) and v1 (the ``memory`` hierarchy: memory.limit_in_bytes / memory.usage_in_bytes) under ``root``."""
    rooms = []
    for cgroup in memory_cgroups(membership, root):
        names = (cgroup.limit_file, *(("memory.current", "inactive_file") if cgroup.v2
                                      else ("memory.usage_in_bytes", "total_inactive_file")))
        rooms += [_cgroup_room(folder, *names) for folder in cgroup.lineage()]
    limited = [room for room in rooms if room is not None]
    return min(limited) if limited else None


def _cgroup_room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> float | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        usage = float((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):  # no such cgroup or controller here
        return None
    if limit == "max" or float(limit) >= 2**62:  # v1 writes "no limit" as the largest page-aligned int64
        return None
    return max(0.0, float(limit) - usage + float(stat.get(inactive_key, 0)))


def what_would_fit(cfg: TrainConfig, num_params: int, world: int, process_bytes: float, visible: float,
                   on_gpu: bool, model: ModelConfig | None = None) -> list[str]:
    """The single changes of the settings that bring the prediction under ``visible``, each with its prediction;
    when none does alone, the shortest run of them, taken in this order, that does, then with a sequence- or
    tensor-parallel degree added, then on more ranks. A degree always divides the ranks it is proposed for and
    the config accepts. Under train.checkpoint_async=auto, each change is weighed as it would run: saving
    synchronously where only that fits."""
    if cfg.train.checkpoint_async == AUTO:
        cfg = _with(cfg, train=dataclasses.replace(cfg.train, checkpoint_async=False))
    dist_, train = cfg.dist, cfg.train
    changes: list[tuple[str, Callable[[TrainConfig], TrainConfig]]] = []
    if dist_.zero_stage < 3 and dist_.tensor_parallel == 1:  # tensor parallel stops at ZeRO-2
        changes.append(("dist.zero_stage=3", lambda c: _with(c, dist=dataclasses.replace(c.dist, zero_stage=3))))
    if not dist_.activation_checkpointing:
        changes.append(("dist.activation_checkpointing=true",
                        lambda c: _with(c, dist=dataclasses.replace(c.dist, activation_checkpointing=True))))
    if train.micro_batch_size > 1:
        changes.append(("train.micro_batch_size=1",
                        lambda c: _with(c, train=dataclasses.replace(c.train, micro_batch_size=1))))
    if train.checkpoint_async is True:  # auto goes synchronous by itself where only that fits
        changes.append(("train.checkpoint_async=false",
                        lambda c: _with(c, train=dataclasses.replace(c.train, checkpoint_async=False))))
    if on_gpu and not dist_.offload_optimizer:
        changes.append(("dist.offload_optimizer=true", lambda c: _with(c, dist=dataclasses.replace(
            c.dist, zero_stage=max(1, c.dist.zero_stage), offload_optimizer=True))))

    def first_fit(options: list[tuple[str, TrainConfig]], ranks: int) -> tuple[str, float] | None:
        for name, changed in options:
            need = estimate(changed, num_params, ranks, process_bytes, on_gpu, model).total
            if need <= visible:
                return name, need
        return None

    singles = [first_fit([(name, change(cfg))], world) for name, change in changes]
    if cfg.dist.zero_stage >= 1:
        singles.append(first_fit([(f"{2 * world} ranks", cfg)], 2 * world))
    for axis in PARALLEL_AXES:  # the smallest degree that fits this job's ranks; where they take none, twice as many
        layouts = _layouts(cfg, world, axis)
        if layouts:
            singles.append(first_fit(layouts, world))
        else:
            singles.append(first_fit([(f"{name} on {2 * world} ranks", changed)
                                      for name, changed in _layouts(cfg, 2 * world, axis)], 2 * world))
    found = [f"{name} ({need / GB:.1f} GB)" for name, need in filter(None, singles)]
    if found:
        return found
    names, changed = [], cfg
    for name, change in changes:
        names.append(name)
        changed = change(changed)
        if fit := first_fit([(" ".join(names), changed)], world):
            return [f"{fit[0]} ({fit[1] / GB:.1f} GB)"]
    ranks = world
    while ranks <= 1 << 16:  # this job's ranks, then twice as many, and so on: as they are (ZeRO), or split further
        more = [("", changed)] if ranks > world and changed.dist.zero_stage >= 1 else []
        layouts = more + [option for axis in PARALLEL_AXES for option in _layouts(changed, ranks, axis)]
        if fit := first_fit(layouts, ranks):
            where = f" on {ranks} ranks" if ranks > world else ""
            return [f"{' '.join([*names, fit[0]]).strip()}{where} ({fit[1] / GB:.1f} GB)"]
        ranks *= 2
    return []


PARALLEL_AXES = ("sequence_parallel", "tensor_parallel", "pipeline_parallel", "expert_parallel")


def _layouts(cfg: TrainConfig, ranks: int, axis: str) -> list[tuple[str, TrainConfig]]:
    """``cfg`` with each degree of ``axis`` above its present one that ``ranks`` ranks can take, smallest first: a
    divisor of ``ranks`` that the config itself accepts (its checks refuse a degree that does not divide the heads
    or the block, the two axes at once, tensor parallel at ZeRO-3 or at ZeRO-0 in mixed precision)."""
    options = []
    # a block per stage, an expert per rank, a head per rank
    most = {"pipeline_parallel": cfg.model.n_layer, "expert_parallel": cfg.model.n_experts}.get(axis, cfg.model.n_head)
    for degree in range(getattr(cfg.dist, axis) + 1, min(ranks, most) + 1):
        if ranks % degree:
            continue
        try:
            options.append((f"dist.{axis}={degree}", _with(cfg, dist=dataclasses.replace(cfg.dist, **{axis: degree}))))
        except ValueError:  # refused by the config: not a layout to propose
            continue
    return options


def _with(cfg: TrainConfig, **sections) -> TrainConfig:
    return dataclasses.replace(cfg, **sections)
