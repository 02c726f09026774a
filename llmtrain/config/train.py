"""The roots of the training commands: ``llmtrain-train`` (every section, the run folder and the checks across
sections) and ``llmtrain-compare`` (the same, run in both modes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from llmtrain.config.checks import bounded, nonempty, raise_problems
from llmtrain.config.data import DataConfig
from llmtrain.config.layout import DistConfig, Mode, parallel_problems
from llmtrain.config.loop import OptimConfig, OptimizerName, Precision, TrainLoopConfig, WandbConfig
from llmtrain.config.model import ModelConfig
from llmtrain.config.ps import PSConfig


class Resume(str, Enum):
    """What a run does in a run.dir that already holds a history (checkpoints, metrics.jsonl)."""

    auto = "auto"
    restart = "restart"

@dataclass(kw_only=True)
class RunConfig:
    """Where a training run lives."""

    dir: str = MISSING
    """Run folder: checkpoints, metrics.jsonl, config.yaml, wandb files. Re-running resumes from it."""
    resume: Resume = Resume.auto
    """auto: continue from the newest intact checkpoint in run.dir when there is one | restart: start over at step 0,
    moving the folder's earlier history (checkpoints, metrics.jsonl, ...) into run.dir/previous/<n>/ (needed once
    every checkpoint is damaged)."""

    def __post_init__(self) -> None:
        raise_problems(nonempty("run.dir", self.dir, "give the run folder, run.dir=runs/<name>"), "run")


@dataclass(kw_only=True)
class TrainConfig:
    """Root of ``llmtrain-train``."""

    data: DataConfig = field(default_factory=DataConfig)
    """The prepared dataset (prepared first, from these settings, when data.dir holds none)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model architecture."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """The training loop."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Data, tensor and sequence parallelism."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb logging."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run folder."""
    precision: Precision = Precision.bf16
    """fp32 | bf16 | fp16 (fp16 needs CUDA; dynamic loss scaling)."""
    mode: Mode = Mode.sync
    """sync (DeepSpeed ZeRO, every rank a data-parallel replica) | async_ps (workers and parameter servers)."""
    ps: PSConfig = field(default_factory=PSConfig)
    """The parameter-server mode's settings."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode == Mode.async_ps and self.precision == Precision.fp16:
            problems.append("mode=async_ps runs in fp32 or bf16 (fp16 would need loss scaling across workers, "
                            "which it does not have): use precision=bf16")
        if self.mode != Mode.async_ps and self.ps.join:
            problems.append("ps.join=true adds a worker to a parameter-server job: it needs mode=async_ps")
        if self.mode == Mode.async_ps and self.ps.diloco:
            problems += [f"train.{key}={getattr(self.train, key)} must be a multiple of ps.inner_steps="
                         f"{self.ps.inner_steps} under ps.algorithm=diloco: steps end rounds there"
                         for key in ("max_steps", "eval_every", "checkpoint_every", "stop_at_step")
                         if getattr(self.train, key) % self.ps.inner_steps]
        if self.dist.offload_optimizer and self.optim.name == OptimizerName.sgd:
            problems.append("dist.offload_optimizer=true works with optim.name=adamw only (DeepSpeed's CPU Adam)")
        if self.model.vocab_size and self.model.vocab_size < 260:
            problems.append(f"model.vocab_size={self.model.vocab_size} is below the tokenizer's minimum of 260")
        if self.data.mix is not None and self.train.subset_tokens:
            problems.append("train.subset_tokens restricts one data.dir; it does not combine with data.mix")
        window = self.model.block_size + 1
        if 0 < self.train.subset_tokens < window:
            problems.append(f"train.subset_tokens={self.train.subset_tokens} is less than one window of "
                            f"model.block_size+1 = {window} tokens (0 = the whole split)")
        if self.data.mix is None:
            problems += nonempty("data.dir", self.data.dir, "give a prepared folder, data.dir=<folder>, or data.mix")
        problems += parallel_problems(self.model, self.dist, self.mode)
        if self.dist.pipeline_parallel > 1 and self.dist.zero_stage == 0 and self.precision != Precision.fp32:
            problems.append(f"dist.pipeline_parallel={self.dist.pipeline_parallel} with precision="
                            f"{self.precision.value} needs dist.zero_stage=1: DeepSpeed's universal conversion, "
                            "which exports and resumes a pipeline's checkpoints in other layouts, fails on its "
                            "ZeRO-0 mixed-precision ones")
        if self.dist.pipeline_parallel > 1 and self.train.slow_rank_factor != 1.0:
            problems.append(f"train.slow_rank_factor={self.train.slow_rank_factor} slows one rank's micro-batches, "
                            "which DeepSpeed's pipeline schedule runs inside train_batch: it does not combine with "
                            "dist.pipeline_parallel>1")
        if self.dist.tensor_parallel > 1 and self.dist.zero_stage == 0 and self.precision != Precision.fp32:
            # Measured on `tiny`, tensor parallel 2 in bf16: DeepSpeed's ZeRO-0 bf16 optimizer reported (and clipped
            # at) a gradient norm of 0.80 where the 1-process norm is 0.91; at ZeRO-1 it matches.
            problems.append(f"dist.tensor_parallel={self.dist.tensor_parallel} with precision={self.precision.value} "
                            "needs dist.zero_stage=1 or 2: DeepSpeed's ZeRO-0 mixed-precision optimizer misses "
                            "the other ranks' slices in its gradient norm")
        raise_problems(problems, "training")

@dataclass(kw_only=True)
class CompareSection:
    """What ``llmtrain-compare`` runs side by side."""

    dir: str = MISSING
    """Output folder: one run folder per mode, the plots and the table."""
    compute_ranks: int = 2
    """Ranks that compute gradients in each mode: sync data-parallel ranks = async workers."""
    staleness_lr: bool = True
    """Also run async with ps.staleness_lr=true."""
    slow_rank_factor: float = 1.0
    """A straggler scenario: above 1, every mode runs a second time with one compute rank this many times slower per
    micro-batch (train.slow_rank_factor), and the plots show both scenarios side by side."""
    inner_steps: list[int] = field(default_factory=list)
    """Also run DiLoCo (ps.algorithm=diloco, 1 server) once per H in this list, e.g. [4,16,64] (empty: none)."""
    sync_rounds: bool = True
    """The DiLoCo runs' ps.sync_rounds."""

    def __post_init__(self) -> None:
        problems = nonempty("compare.dir", self.dir, "give the output folder, compare.dir=runs/<name>")
        problems += bounded("compare.compute_ranks", self.compute_ranks, 1, 1 << 16)
        problems += [p for h in self.inner_steps for p in bounded("compare.inner_steps", h, 1, 1 << 20)]
        if not 1.0 <= self.slow_rank_factor <= 1000.0:  # also refuses nan
            problems.append(f"compare.slow_rank_factor={self.slow_rank_factor} must be between 1 and 1000")
        raise_problems(problems, "compare")


@dataclass(kw_only=True)
class CompareConfig(TrainConfig):
    """Root of ``llmtrain-compare``: a training config, run in both modes, plus what to compare."""

    compare: CompareSection = field(default_factory=CompareSection)
    """The comparison's settings."""
