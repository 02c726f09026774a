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
_PUBLISHED = threading.Condition()


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
        _PUBLISHED.notify_all()


def shared(index: int) -> str:
    """The ``index``-th decision process 0 published (waiting for it)."""
    with _PUBLISHED:
        _PUBLISHED.wait_for(lambda: len(_SHARED) > index)
        return _SHARED[index]


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


def diverged() -> tuple[int, int] | None:
    """The first and last step of the non-finite streak that stopped the run, if one did."""
    return server().diverged


def stage_shard() -> None:
    server().stage()


def write_staged(path: str) -> None:
    """Write the shard state ``stage_shard`` copied, and flush it to the disk."""
    torch.save(server().staged, path)
    fsync_path(path)
    server().staged = None


def stop_at(updates: int) -> int:
    return server().stop_at(updates)


def release(diverged: tuple[int, int] | None = None) -> None:
    """Server 0 lets this server leave (telling it whether the run diverged)."""
    server().diverged = diverged
    server().released.set()
