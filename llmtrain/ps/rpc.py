"""The RPC entry points of a parameter-server process, and the one server object they reach.

``torch.distributed.rpc`` calls module-level functions by reference, so each server process installs its
``ParameterServer`` here once (before joining the RPC group); workers and server 0 call these functions on it
through ``rpc.rpc_async`` / ``rpc.rpc_sync`` (server 0 calls its own directly). A server answers pulls only once
it is ``ready`` (its shard resumed, where the run resumes).

Process 0 also hands its decisions to the others here (``publish`` / ``shared``: the mode's ``Peers.share``).
"""

from __future__ import annotations

import threading

import torch

from llmtrain.ps.server import ParameterServer
from llmtrain.run.checkpoint import fsync_path

_SERVER: ParameterServer | None = None
_SHARED: list[str] = []
_READS: list[int] = []
"""How many processes read each decision (``shared``)."""
_PUBLISHED = threading.Condition()
_LEAVING = False
"""Set while this server leaves: a call still waiting for a decision ends (its thread would hold the exit)."""


def install(server: ParameterServer) -> ParameterServer:
    """Make ``server`` the object this process's entry points act on."""
    global _SERVER
    _SERVER = server
    return server


def server() -> ParameterServer:
    assert _SERVER is not None, "no parameter server installed in this process"
    return _SERVER


def publish(value: str) -> None:
    """Process 0: make ``value`` the next decision the others read with ``shared``."""
    with _PUBLISHED:
        _SHARED.append(value)
        _READS.append(0)
        _PUBLISHED.notify_all()


def shared(index: int) -> str:
    """The ``index``-th decision process 0 published (waiting for it)."""
    with _PUBLISHED:
        _PUBLISHED.wait_for(lambda: len(_SHARED) > index or _LEAVING)
        if len(_SHARED) <= index:
            raise RuntimeError("process 0 left before deciding")
        _READS[index] += 1
        _PUBLISHED.notify_all()
        return _SHARED[index]


def leaving(now: bool) -> None:
    """Whether this server is leaving: waits for decisions that will not come end (``shared``)."""
    global _LEAVING
    with _PUBLISHED:
        _LEAVING = now
        _PUBLISHED.notify_all()


def wait_read(readers: int, seconds: float) -> bool:
    """Process 0, leaving after a refusal: wait until ``readers`` processes have read its last decision (or
    ``seconds`` passed); whether they did."""
    with _PUBLISHED:
        return _PUBLISHED.wait_for(lambda: not _READS or _READS[-1] >= readers, timeout=seconds)


def pull(worker: int) -> tuple[int, dict[str, torch.Tensor]]:
    server().ready.wait()
    return server().pull(worker)


def push(worker: int, grads: dict[str, torch.Tensor], computed_on: int, stats: dict, wanted: int) -> list[int]:
    """Apply a worker's update; the units of data it is leased next (asked of server 0 only: ``wanted`` 0
    elsewhere)."""
    return server().push(worker, grads, computed_on, stats, wanted)


def finished(worker: int) -> None:
    server().finish(worker)


def read_shard() -> dict[str, torch.Tensor]:
    """The shard's fp32 master weights (for evaluation and the consolidated model)."""
    return server().master_weights()


def first_grant(worker: int, wanted: int) -> list[int]:
    """The first units of data ``worker`` is leased, once the servers hold what the run starts from."""
    server().ready.wait()
    return server().grant(worker, wanted)


def revoke(worker: int, units: list[int]) -> None:
    server().revoke(worker, units)


def wait_grant(worker: int, wanted: int, seconds: float) -> list[int] | None:
    return server().wait_grant(worker, wanted, seconds)


def join() -> int:
    """A worker started later (ps.join=true) takes the next free worker id (asked of server 0)."""
    return server().join()


def leave(worker: int) -> None:
    """A worker stops taking work (a stop signal): its leases go to the others at once (asked of server 0)."""
    server().leave(worker)


def diverged() -> tuple[int, int] | None:
    """The first and last step of the non-finite streak that stopped the run, if one did."""
    return server().diverged


def heartbeat(worker: int) -> None:
    """A DiLoCo worker between its pull and its push says it is alive (asked of server 0)."""
    with server().lock:
        server()._seen(worker)


def close_round(workers: list[int]) -> None:
    """Server 0 closed the open round of DiLoCo's sync rounds: apply the mean of these workers' pseudo-gradients."""
    server().apply_round(workers)


def inner_state(worker: int) -> dict | None:
    """The inner optimizer state ``worker`` continues from (a resumed DiLoCo run), if server 0 holds one."""
    server().ready.wait()
    return server().inner_state(worker)


def put_inner(worker: int, state: dict) -> None:
    """A DiLoCo worker that finishes hands server 0 its inner optimizer state, for the run's last checkpoint."""
    server().take_inner(worker, state)


def stage_shard() -> None:
    server().stage()


def write_staged(path: str) -> None:
    """Write the shard state ``stage_shard`` copied, and flush it to the disk."""
    torch.save(server().staged, path)
    fsync_path(path)
    server().staged = None


def write_shard(path: str) -> None:
    """Write this server's shard state directly (its updates wait meanwhile; no host copy, and the buffers of
    earlier background saves handed back), and flush it to the disk."""
    server().write(path)
    fsync_path(path)


def stop_at(updates: int) -> int:
    return server().stop_at(updates)


def freeze() -> int:
    return server().freeze()


def release(diverged: tuple[int, int] | None = None) -> None:
    """Server 0 lets this server leave (telling it whether the run diverged)."""
    server().diverged = diverged
    server().released.set()


ENTRY_POINTS = {fn.__name__: fn for fn in (shared, pull, push, finished, read_shard, first_grant, revoke, wait_grant,
                                           join, leave, diverged, stage_shard, write_staged, write_shard, stop_at,
                                           freeze, release, heartbeat, close_round, inner_state, put_inner)}
"""What a caller may run on a server, by name (the gRPC transport sends names, never code)."""
