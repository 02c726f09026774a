"""The parameter-server mode: ``ps.*`` (mode=async_ps)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from llmtrain.config.checks import MAX_COUNT, MAX_TIMEOUT_S, bounded_each, raise_problems


class Algorithm(str, Enum):
    downpour = "downpour"
    diloco = "diloco"


class PushDtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Transport(str, Enum):
    tcp = "tcp"
    auto = "auto"
    grpc = "grpc"

@dataclass(kw_only=True)
class PSConfig:
    """The parameter-server mode (mode=async_ps): the first num_servers ranks serve, the others compute."""

    algorithm: Algorithm = Algorithm.downpour
    """downpour: workers push gradients, the servers apply each with the optimizer (Dean et al. 2012) | diloco:
    workers take ps.inner_steps steps of the optimizer (optim.*) on their own data, then push the pseudo-gradient
    (the weights pulled minus the weights reached), which the servers apply with an outer Nesterov SGD (Douillard
    et al. 2023)."""
    inner_steps: int = 25
    """diloco's H: local steps a worker takes between a pull and its push (a round). train.max_steps, eval_every,
    checkpoint_every and stop_at_step must be multiples of it (25 divides the defaults' and experiment=demo's)."""
    outer_lr: float = 0.7
    """diloco: the outer SGD's learning rate (constant)."""
    outer_momentum: float = 0.9
    """diloco: the outer SGD's momentum; Nesterov's when above 0."""
    sync_rounds: bool = True
    """diloco: true = the servers average the W pseudo-gradients of a round, then take one outer step (DiLoCo as
    published) | false = each is applied as it arrives, with the Delayed Nesterov update (Liu et al. 2024)."""
    nesterov_buffer: int = 0
    """diloco with ps.sync_rounds=false: Delayed Nesterov's N, the pseudo-gradients buffered per momentum update
    (0 = the number of workers)."""
    momentum_activation: float = 0.0
    """diloco with ps.sync_rounds=false: Delayed Nesterov's c in [0, 1/N], the share of the momentum applied at the
    updates between two momentum updates."""
    push_dtype: PushDtype | None = None
    """diloco: the dtype pseudo-gradients travel in (null = precision's); the servers accumulate in fp32."""
    num_servers: int = 1
    """Parameter servers; the model's tensors are split among them, balanced by size."""
    max_staleness: int = 0
    """Bound on asynchrony: a worker more than this many updates ahead of the slowest live worker waits at
    its pull (stale-synchronous parallel); 0 = no bound."""
    staleness_lr: bool = False
    """Divide the learning rate of each update by its staleness (Zhang et al. 2016)."""
    timeout_s: int = 60
    """A pull or push that takes longer fails the worker (a lost server ends the job within this time)."""
    push_every: int = 1
    """Downpour's n_push: a worker sums the gradients of this many local steps (each global_batch_size / workers
    sequences) and pushes them as one update of that larger batch."""
    fetch_every: int = 1
    """Downpour's n_fetch: a worker pulls fresh weights every this many local steps and computes on the ones it
    holds in between."""
    overlap: bool = False
    """Pull the next weights and push the last gradient in the background while the next local step computes (at
    most one pull and one push in flight): every update is then at least one version stale."""
    transport: Transport = Transport.tcp
    """How pulls and pushes travel. tcp: torch.distributed.rpc over TensorPipe's libuv TCP transport (event-driven:
    a waiting process sleeps) | auto: TensorPipe's own pick (shared memory within a host, InfiniBand where there is
    one, else TCP); its shared-memory reactor thread busy-polls, taking a core from every process | grpc: gRPC, with
    no group membership to break: workers may be lost and others join (ps.join) while the job runs."""
    join: bool = False
    """Start this process as one more worker of a job that is running (ps.transport=grpc) in the same run.dir,
    whatever its launcher rank; it is leased work like the job's own workers, and a stop signal makes it leave."""
    tls_dir: str | None = None
    """ps.transport=grpc over TLS: a folder holding cert.pem and key.pem (the servers' certificate, issued for the
    name llmtrain-ps, and its key) and ca.pem (the authority that signed it), readable by every process of the job.
    Without it calls travel unencrypted; either way each carries the job's secret."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded_each("ps.", self, {
            "num_servers": (1, 1 << 16), "max_staleness": (0, MAX_COUNT), "timeout_s": (1, MAX_TIMEOUT_S),
            "push_every": (1, 1 << 20), "fetch_every": (1, 1 << 20), "inner_steps": (1, 1 << 20),
            "nesterov_buffer": (0, 1 << 20)})
        if not self.outer_lr > 0 or not math.isfinite(self.outer_lr):  # also refuses nan
            problems.append(f"ps.outer_lr={self.outer_lr} must be above 0")
        if not 0 <= self.outer_momentum < 1:
            problems.append(f"ps.outer_momentum={self.outer_momentum} must be in [0, 1)")
        if not 0 <= self.momentum_activation <= 1:
            problems.append(f"ps.momentum_activation={self.momentum_activation} must be in [0, 1/ps.nesterov_buffer]")
        if self.algorithm == Algorithm.diloco:
            problems += self._diloco_problems()
        if self.join and self.transport != Transport.grpc:
            problems.append(f"ps.join=true needs ps.transport=grpc (the job's too): TensorPipe's group takes no "
                            f"process after it started (ps.transport={self.transport.value})")
        if self.tls_dir is not None and self.transport != Transport.grpc:
            problems.append(f"ps.tls_dir is for ps.transport=grpc (ps.transport={self.transport.value})")
        raise_problems(problems, "ps")

    def _diloco_problems(self) -> list[str]:
        problems = [f"ps.{key}={getattr(self, key)} is Downpour's: under ps.algorithm=diloco a worker pulls and pushes "
                    f"once per round of ps.inner_steps local steps (leave ps.{key}=1)"
                    for key in ("push_every", "fetch_every") if getattr(self, key) != 1]
        if self.overlap:
            problems.append("ps.overlap=true is Downpour's: under ps.algorithm=diloco each round starts from the "
                            "weights its own last pseudo-gradient was applied to (leave ps.overlap=false)")
        if self.sync_rounds:
            problems += [f"ps.{key}={getattr(self, key)} bounds asynchrony, and ps.sync_rounds=true has none: use "
                         f"ps.sync_rounds=false, or leave ps.{key} at its default"
                         for key in ("max_staleness", "staleness_lr") if getattr(self, key)]
        return problems

    @property
    def diloco(self) -> bool:
        return self.algorithm == Algorithm.diloco
