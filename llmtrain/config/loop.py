"""The training loop: precision, ``optim.*`` (optimizer and schedule), ``train.*`` (steps, batches, evaluation,
checkpoints, cadence) and ``wandb.*`` (its dashboards)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from llmtrain.config.checks import MAX_COUNT, MAX_SEED, bounded, bounded_each, raise_problems

AUTO = "auto"
"""train.checkpoint_async's third value."""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OptimizerName(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Decay(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"

class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"

@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: OptimizerName = OptimizerName.adamw
    """adamw (DeepSpeed's CPU Adam when the optimizer is offloaded) | sgd (with momentum)."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio at train.max_steps."""
    warmup_steps: int = 100
    """Linear warm-up from 0 over this many optimizer steps."""
    decay: Decay = Decay.cosine
    """After warm-up: cosine | linear | constant."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to weight matrices and embeddings only (not to norms or biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded("optim.lr", self.lr, 0.0, low_open=True)
        problems += bounded("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        problems += bounded("optim.warmup_steps", self.warmup_steps, 0, MAX_COUNT)
        for name in ("beta1", "beta2", "momentum"):
            problems += bounded(f"optim.{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        problems += bounded("optim.eps", self.eps, 0.0, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            problems += bounded(f"optim.{name}", getattr(self, name), 0.0)
        raise_problems(problems, "optim")


@dataclass(kw_only=True)
class TrainLoopConfig:
    """Steps, batch sizes, evaluation, checkpoints and logging cadence."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all ranks = micro_batch_size x grad accumulation x data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    seed: int = 1337
    """Seed of the model init and the data order."""
    subset_tokens: int = 0
    """Train on a fixed subset of the train split, this many tokens in whole windows (the run's first windows),
    repeated epoch after epoch; 0 = the whole split. For small-data comparisons (docs/benchmarks.md, "Baselines")."""
    eval_every: int = 100
    """Evaluate on the fixed validation windows every N steps (0 = only at the end)."""
    eval_windows: int = 200
    """Validation windows per evaluation (0 = all), spread evenly over the val split."""
    checkpoint_every: int = 200
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest K complete checkpoints."""
    checkpoint_async: bool | str = "auto"
    """Save in the background: auto | true | false. The loop stops only while each rank snapshots its part of the
    checkpoint (host copies of at most train.checkpoint_buffer_gb, the rest read live before its next update), a
    thread writes it, and it is marked complete once every rank's files are on the disk; a run's last save is
    written directly. auto = in the background unless the start-up memory prediction fits only without the copies;
    false = the loop waits for every save."""
    checkpoint_buffer_gb: float | None = 1.0
    """Host memory per rank for a background save's copies, kept from save to save: its largest files that fit are
    copied, the others are written from the live tensors while the next step computes (its update waits for them).
    null = every file copied (a whole copy of the rank's part of a checkpoint); 0 = none."""
    log_every: int = 10
    """Log metrics every N steps."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each is skipped)."""
    stop_at_step: int = 0
    """Save a checkpoint and stop at this step (0 = never); the schedule still spans max_steps."""
    compile: bool | None = None
    """torch.compile the model (through DeepSpeed's ``engine.compile``); null = on with CUDA, off on CPU, where fp32
    gains nothing and bf16 gains less than the first compile costs a short run (docs/benchmarks.md, torch.compile)."""
    slow_rank_factor: float = 1.0
    """A simulated straggler (llmtrain-compare's scenarios): the last compute rank (sync: the last rank; async: the
    last worker) takes this many times longer per micro-batch, sleeping factor - 1 times its measured compute time
    after each. 1 = no straggler."""
    router_aux_coef: float = 0.01
    """Weight of the mixture-of-experts load-balancing loss in the objective (Switch / GShard: n_experts / k x the sum
    over experts of (share of routes) x (mean router probability), 1 when balanced), per micro-batch and rank."""
    router_z_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE: the mean squared log-sum-exp of the router logits)."""
    router_collapse_steps: int = 100
    """Warn once when an expert has received no tokens for this many steps (counted over log intervals)."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.checkpoint_async, str):  # "true" / "false" as a quoted string in a YAML file
            self.checkpoint_async = {"true": True, "false": False}.get(self.checkpoint_async.lower(),
                                                                       self.checkpoint_async.lower())
        if self.checkpoint_async not in (True, False, AUTO):
            problems.append(f"train.checkpoint_async={self.checkpoint_async} must be auto, true or false")
        if self.checkpoint_buffer_gb is not None:
            problems += bounded("train.checkpoint_buffer_gb", self.checkpoint_buffer_gb, 0.0, float(1 << 20))
        if not 1.0 <= self.slow_rank_factor <= 1000.0:  # also refuses nan
            problems.append(f"train.slow_rank_factor={self.slow_rank_factor} must be between 1 and 1000")
        problems += bounded_each("train.", self, {
            "max_steps": (1, MAX_COUNT), "global_batch_size": (1, 1 << 24), "micro_batch_size": (1, 1 << 16),
            "log_every": (1, MAX_COUNT), "keep_checkpoints": (1, MAX_COUNT), "max_nonfinite_steps": (1, MAX_COUNT),
            "eval_every": (0, MAX_COUNT), "eval_windows": (0, MAX_COUNT), "checkpoint_every": (0, MAX_COUNT),
            "stop_at_step": (0, MAX_COUNT), "subset_tokens": (0, MAX_COUNT), "seed": (0, MAX_SEED),
            "router_collapse_steps": (1, MAX_COUNT), "router_aux_coef": (0.0, 1e6), "router_z_coef": (0.0, 1e6)})
        if self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            problems.append(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size={self.micro_batch_size}")
        raise_problems(problems, "train")

    @property
    def background_saves(self) -> bool:
        """Whether saves may go to the background: train.checkpoint_async=true, or auto until the start-up memory
        check finds that only synchronous saves fit."""
        return self.checkpoint_async is not False

    @property
    def buffer_bytes(self) -> float | None:
        """train.checkpoint_buffer_gb in bytes (None: no bound)."""
        return None if self.checkpoint_buffer_gb is None else self.checkpoint_buffer_gb * 2**30

@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    mode: WandbMode = WandbMode.disabled
    """online (needs `wandb login`) | offline (synced later with `wandb sync`) | disabled."""
    project: str = "llmtrain"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); None = your default."""
    name: str | None = None
    """Run name; None = the name of run.dir."""
    group: str | None = None
    """Run group, e.g. to compare several runs."""
