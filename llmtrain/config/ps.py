"""The parameter-server mode: ``ps.*`` (mode=async_ps)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from llmtrain.config.checks import MAX_COUNT, MAX_TIMEOUT_S, bounded_each, raise_problems


class Transport(str, Enum):
    tcp = "tcp"
    auto = "auto"
    grpc = "grpc"

@dataclass(kw_only=True)
class PSConfig:
    """The parameter-server mode (mode=async_ps): the first num_servers ranks serve, the others compute."""

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

    def __post_init__(self) -> None:
        problems = []
        problems += bounded_each("ps.", self, {
            "num_servers": (1, 1 << 16), "max_staleness": (0, MAX_COUNT), "timeout_s": (1, MAX_TIMEOUT_S),
            "push_every": (1, 1 << 20), "fetch_every": (1, 1 << 20)})
        if self.join and self.transport != Transport.grpc:
            problems.append(f"ps.join=true needs ps.transport=grpc (the job's too): TensorPipe's group takes no "
                            f"process after it started (ps.transport={self.transport.value})")
        raise_problems(problems, "ps")
