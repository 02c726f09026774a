"""How a rank ends (llmtrain/distributed/exit.py), in this process: which ranks end without finalization (gloo, or no
CUDA) and which through ``sys.exit`` (NCCL), the exit code, the handlers, the linger. Real ranks ending over gloo:
tests/integration/test_exit_processes.py."""

from __future__ import annotations

import atexit
import os
import sys
from types import SimpleNamespace

import pytest

from llmtrain.distributed import exit as ending


def modules(backend: str | None, cuda: bool) -> dict[str, SimpleNamespace]:
    """sys.modules as ending sees it: a group of ``backend`` up (None: no group), on a host with or without CUDA."""
    dist = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: backend is not None,
                           get_backend=lambda: backend)
    return {"torch.distributed": dist, "torch": SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: cuda))}


@pytest.mark.parametrize(("backend", "cuda", "abrupt"), [
    ("gloo", False, True), ("gloo", True, True), ("cpu:gloo,cuda:nccl", True, True),  # gloo's threads may be there
    ("nccl", True, False), (None, True, False),  # NCCL, or a CUDA host with no group up: a normal exit
    (None, False, True)])  # no group up on a CPU host: any it had was gloo
def test_only_gloo_ranks_and_cpu_hosts_end_without_finalization(backend, cuda, abrupt):
    assert ending.ends_without_finalization(modules(backend, cuda)) is abrupt


def test_a_process_without_torch_ends_normally():
    assert not ending.ends_without_finalization({})


class Exited(Exception):
    pass


def fake_os_exit(code: int):
    raise Exited(code)


@pytest.fixture
def handlers(monkeypatch):
    ran = []
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append("handlers"))
    monkeypatch.setattr(os, "_exit", fake_os_exit)
    return ran


def test_without_finalization_the_handlers_run_then_os_exit(monkeypatch, handlers):
    monkeypatch.setattr(ending, "ends_without_finalization", lambda: True)
    with pytest.raises(Exited) as exited:
        ending.exit_now(3)
    assert exited.value.args == (3,) and handlers == ["handlers"]


def test_elsewhere_a_rank_ends_through_sys_exit(monkeypatch, handlers):
    monkeypatch.setattr(ending, "ends_without_finalization", lambda: False)
    with pytest.raises(SystemExit) as exited:
        ending.exit_now(3)
    assert exited.value.code == 3 and handlers == []  # the interpreter runs them as it finalizes


@pytest.mark.parametrize(("ending_of_main", "code", "lingers"), [
    ("return", 0, False), ("sys.exit(3)", 3, False), ("sys.exit(None)", 0, False), ("raise", 1, True),
    ("sys.exit('bad input')", 1, False)])
def test_the_exit_code_of_main(monkeypatch, capsys, ending_of_main, code, lingers):
    codes, lingered = [], []
    monkeypatch.setattr(ending, "exit_now", codes.append)
    monkeypatch.setattr(ending, "linger_for_local_peers", lambda: lingered.append(True))
    monkeypatch.setattr(ending.faulthandler, "enable", lambda **kwargs: None)  # pytest's capture has no fileno

    def main():
        if ending_of_main == "raise":
            raise RuntimeError("boom")
        if ending_of_main != "return":
            exec(ending_of_main, {"sys": sys})

    ending.ended_process(main)()
    assert codes == [code] and bool(lingered) is lingers
    err = capsys.readouterr().err
    assert ("RuntimeError: boom" in err) is (ending_of_main == "raise")
    assert ("bad input" in err) is ("bad input" in ending_of_main)


@pytest.mark.parametrize(("env", "lingers"), [({"LOCAL_WORLD_SIZE": "2"}, True), ({"LOCAL_SIZE": "4"}, True),
                                              ({"LOCAL_WORLD_SIZE": "1"}, False), ({}, False)])
def test_a_failure_lingers_once_beside_local_peers(monkeypatch, env, lingers):
    slept = []
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ending, "_lingered", False)
    monkeypatch.setattr(ending.time, "sleep", slept.append)
    ending.linger_for_local_peers()
    ending.linger_for_local_peers()  # the Hydra wrapper and ended_process may both see the failure
    assert slept == ([ending.LINGER_S] if lingers else [])


def test_a_closed_connection_names_the_lost_node():
    # gloo's TCP pair, wrapped as the collective re-raises it
    cause = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:41234: "
                         "Connection reset by peer")
    try:
        raise RuntimeError("all_reduce failed") from cause
    except RuntimeError as exc:
        wrapped = exc
    # in a Slurm job, the node whose name resolves to the address; outside one, the address
    assert ending.lost_peer(wrapped, {"SLURM_JOB_NODELIST": "localhost"}).startswith(
        "lost node localhost (127.0.0.1): connection reset by peer; a rank there died")
    closed = RuntimeError("Connection closed by peer [10.0.0.9]:5555")
    assert ending.lost_peer(closed, {}).startswith("lost 10.0.0.9: connection closed by peer; ")
    assert ending.lost_peer(ValueError("shape mismatch"), {}) is None
