"""``llmtrain-train --check``: a config checked against a launch before any rank starts.

    llmtrain-train --check --nproc_per_node 8 --nnodes 2 data.dir=data/stdlib run.dir=runs/x dist.zero_stage=3
    llmtrain-train --check --nproc_per_node 4 --nnodes 1:2 ...    # an elastic job: every world size in MIN:MAX

It reads what a start would read (``data.dir``'s vocabulary, ``model.init_from``'s shapes), builds nothing but the
model's shape on the meta device, and refuses in one line (exit 2) what a start on that layout would refuse: a
degree that does not divide the ranks, a global batch that does not divide, a layout the model's sizes do not
take, model states larger than the device's memory. Otherwise it prints the grid, the predicted memory per rank and,
where it does not fit, ``what_would_fit``, and exits 0. The launch scripts run it first, so that a bad layout is one
line before the launcher starts anything.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from llmtrain.config import Mode, TrainConfig, parallel_problems
from llmtrain.distributed import memory
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


@dataclasses.dataclass(frozen=True)
class Launch:
    """The layout a command will be launched on: processes per node, and the node count (a range when elastic)."""

    nproc_per_node: int
    min_nodes: int
    max_nodes: int
    device_memory_gb: float | None = None
    """The memory of one rank's device, where it is not this host's GPU (given with --device-memory-gb)."""

    FLAGS = ("--nproc_per_node", "--nproc-per-node", "--nnodes", "--device-memory-gb", "--device_memory_gb")

    @classmethod
    def parse(cls, args: list[str]) -> tuple[Launch, list[str]]:
        """``--check``'s own flags out of ``args`` (``--flag value`` or ``--flag=value``); the rest are overrides."""
        values: dict[str, str] = {}
        rest, i = [], 0
        while i < len(args):
            flag, eq, value = args[i].partition("=")
            if flag in cls.FLAGS:
                if not eq:
                    if i + 1 >= len(args):
                        raise UserError(f"--check: {flag} needs a value")
                    value, i = args[i + 1], i + 1
                values[flag.replace("-", "_").strip("_")] = value
            elif args[i] != "--check":
                rest.append(args[i])
            i += 1
        try:
            nproc = int(values.get("nproc_per_node", "1"))
            low, _, high = values.get("nnodes", "1").partition(":")
            launch = cls(nproc, int(low), int(high or low),
                         float(values["device_memory_gb"]) if "device_memory_gb" in values else None)
        except ValueError:
            raise UserError(f"--check: --nproc_per_node N, --nnodes M or MIN:MAX and --device-memory-gb G take "
                            f"numbers (given: {values})") from None
        if nproc < 1 or not 1 <= launch.min_nodes <= launch.max_nodes:
            raise UserError(f"--check: --nproc_per_node {nproc} --nnodes {values.get('nnodes', '1')} is no layout: "
                            "at least 1 process per node, and MIN <= MAX nodes")
        return launch, rest

    def describe(self) -> str:
        nodes = f"{self.min_nodes}" if self.min_nodes == self.max_nodes else f"{self.min_nodes} to {self.max_nodes}"
        ranks = (f"{self.min_nodes * self.nproc_per_node}" if self.min_nodes == self.max_nodes else
                 f"{self.min_nodes * self.nproc_per_node} to {self.max_nodes * self.nproc_per_node}")
        return f"{ranks} rank(s), {self.nproc_per_node} per node x {nodes} node(s)"

    def worlds(self) -> list[tuple[int, int]]:
        """(nodes, ranks) for every node count the job may run on."""
        return [(n, n * self.nproc_per_node) for n in range(self.min_nodes, self.max_nodes + 1)]


def check(cfg: TrainConfig, launch: Launch) -> list[str]:
    """What ``--check`` prints: the grid and memory of each world size; a ``UserError`` for the first refusal, which
    names the layout (its ranks) it is refused on."""
    from llmtrain.data.shards import read_meta
    from llmtrain.model import build_model
    from llmtrain.run import setup

    setup.check_data_dir(cfg.data)
    lines = []
    if cfg.data.mix is None and read_meta(cfg.data.dir) is None:  # its source named: the start prepares it
        lines.append(f"data.dir={cfg.data.dir} is not prepared yet (the start prepares it): the vocabulary is "
                     f"data.vocab_size={cfg.data.vocab_size}")
        model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)
    else:
        data = setup.open_data(cfg.data, is_main=False, wait=lambda: None)
        model_cfg = (setup.initial_model(cfg.model, data).model_cfg if cfg.model.init_from
                     else setup.model_config(cfg, data))
        data.check_token_ids(model_cfg.vocab_size)
    problems = parallel_problems(model_cfg, cfg.dist, cfg.mode)  # a model.init_from model's own sizes
    if problems:
        raise UserError("; ".join(problems))
    with torch.device("meta"):
        shape = build_model(model_cfg)
    params = shape.num_params(non_embedding=False)
    lines.append(f"model {model_cfg.name}: {params / 1e6:.2f}M parameters, {model_cfg.n_layer} blocks, vocabulary "
                 f"{model_cfg.vocab_size:,}")
    device, visible = target_memory(launch)
    baseline = memory.process_baseline() if cfg.mode != Mode.async_ps else 0.0  # what a rank holds before its model
    for nodes, world in launch.worlds():
        where = f"{world} rank(s) ({launch.nproc_per_node} per node x {nodes} node(s))"
        try:
            lines += [f"on {where}:", *(f"  {line}" for line in _layout(cfg, model_cfg, params, world, launch,
                                                                           visible, baseline))]
        except UserError as exc:
            raise UserError(f"on {where}: {exc}") from None
    lines.append(f"memory per rank checked against {device}")
    return lines


def target_memory(launch: Launch) -> tuple[str, float | None]:
    """The memory one rank's device has, and what it is; None where it is unknown here (a login or submit host
    without the job's GPUs, and no --device-memory-gb)."""
    if launch.device_memory_gb is not None:
        return f"--device-memory-gb {launch.device_memory_gb:g}", launch.device_memory_gb * memory.GB
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return f"this host's GPU ({total / memory.GB:.1f} GB)", float(total)
    return ("nothing: this host has no GPU, so the target device's memory is unknown here (give --device-memory-gb; "
            "a run on this host's CPUs checks its memory as it starts)"), None


def _layout(cfg: TrainConfig, model_cfg, params: int, world: int, launch: Launch, visible: float | None,
            baseline: float) -> list[str]:
    """One world size: its grid and predicted memory per rank, or the ``UserError`` a start would raise."""
    if cfg.mode == Mode.async_ps and cfg.ps.join:  # more workers of a running job: its layout is the job's
        return [f"{world} more worker(s) for the job in run.dir={cfg.run.dir} (its servers, batch split and budget "
                "are the job's; each joiner checks its settings against them as it starts)"]
    if cfg.mode == Mode.async_ps:
        from llmtrain.ps.job import check_workers

        workers = world - cfg.ps.num_servers
        check_workers(cfg, cfg.ps.num_servers, workers, world)
        shard = params / cfg.ps.num_servers
        server = sum(memory.server_bytes(cfg, shard, workers, params).values())
        return [f"{cfg.ps.num_servers} parameter server(s) + {workers} worker(s)",
                f"memory: {server / memory.GB:.2f} GB per server predicted (server 0's)"]
    from llmtrain.distributed.deepspeed import grad_accumulation_steps
    from llmtrain.distributed.parallel import Topology

    topology = Topology.of(cfg.dist, 0, world)
    accum = grad_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, topology.dp)
    on_gpu = launch.device_memory_gb is not None or torch.cuda.is_available()
    predicted = memory.estimate(cfg, params, world, baseline, on_gpu, model_cfg)
    lines = [topology.describe(),
             f"global batch {cfg.train.global_batch_size} = {cfg.train.micro_batch_size} micro x {accum} accumulation"
             f" x {topology.dp} data-parallel ranks",
             f"memory per rank, predicted: {predicted.describe()}"]
    if visible is None or predicted.total <= visible:
        return lines
    fits = memory.what_would_fit(cfg, params, world, predicted.process, visible, on_gpu, model_cfg)
    advice = f"it would fit with: {' | '.join(fits)}" if fits else "no single change fits it"
    if predicted.model_states > visible:
        raise UserError(f"{params:,} parameters need {predicted.model_states / memory.GB:,.1f} GB of model states "
                        f"per rank, more than the {visible / memory.GB:.1f} GB of the device; {advice}")
    lines.append(f"predicted {predicted.total / memory.GB:.1f} GB per rank, more than the "
                 f"{visible / memory.GB:.1f} GB of the device; {advice}")
    return lines
