"""The RPC entry points of a parameter-server process, and the one server object they reach.

``torch.distributed.rpc`` calls module-level functions by reference, so each server process installs its
``ParameterServer`` here once (before joining the RPC group); workers and server 0 call these functions on it
through ``rpc.rpc_async`` / ``rpc.rpc_sync`` (server 0 calls its own directly).
"""

from __future__ import annotations

import torch

from llmtrain.ps.server import ParameterServer

_SERVER: ParameterServer | None = None


def install(server: ParameterServer) -> ParameterServer:
    """Make ``server`` the object this process's entry points act on."""
    global _SERVER
    _SERVER = server
    return server


def server() -> ParameterServer:
    assert _SERVER is not None, "no parameter server installed in this process"
    return _SERVER


def pull(worker: int) -> tuple[int, dict[str, torch.Tensor]]:
    return server().pull(worker)


def push(worker: int, grads: dict[str, torch.Tensor], computed_on: int, stats: dict) -> bool:
    return server().push(worker, grads, computed_on, stats)


def finished(worker: int) -> None:
    server().finish(worker)


def read_shard() -> dict[str, torch.Tensor]:
    """The shard's fp32 master weights (for evaluation and the consolidated model)."""
    return server().master_weights()


def clock(worker: int) -> int:
    return server().clock[worker]


def save_shard(path: str) -> None:
    torch.save(server().state_dict(), path)


def stop_at(updates: int) -> None:
    server().stop_at(updates)


def release() -> None:
    server().released.set()
