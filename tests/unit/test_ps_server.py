"""The parameter server on its own (no RPC): staleness, the staleness-aware learning rate, the budget, and the
stale-synchronous bound."""

from __future__ import annotations

import threading
import time

import torch

from llmtrain.config import Decay, OptimConfig, OptimizerName
from llmtrain.ps.server import ParameterServer

SGD = OptimConfig(name=OptimizerName.sgd, lr=0.5, momentum=0.0, weight_decay=0.0, warmup_steps=0,
                  decay=Decay.constant)


def server(**kwargs) -> ParameterServer:
    args = dict(optim=SGD, max_steps=3, num_workers=2, staleness_lr=False)
    args.update(kwargs)
    return ParameterServer({"w": torch.zeros(2, 2)}, **args)


def push(ps: ParameterServer, worker: int, version: int) -> bool:
    return ps.push(worker, {"w": torch.ones(2, 2)}, version, {"loss": 1.0, "pull_s": 0.0, "push_s": 0.0, "bytes": 0})


def test_each_push_is_applied_with_its_staleness():
    ps = server()
    version, _ = ps.pull(0)
    assert push(ps, 0, version) and push(ps, 1, version)  # worker 1 computed on version 0, applied at 1
    assert [r["staleness"] for r in ps.records] == [0, 1]
    assert torch.equal(ps.pull(0)[1]["w"], torch.full((2, 2), -1.0))  # two SGD steps of lr 0.5


def test_staleness_aware_lr_divides_by_staleness():
    ps = server(staleness_lr=True)
    push(ps, 0, 0)
    push(ps, 0, 1)
    push(ps, 1, 0)  # staleness 2
    assert [r["lr"] for r in ps.records] == [0.5, 0.5, 0.25]


def test_budget_of_max_steps_times_workers():
    ps = server(max_steps=2)
    results = [push(ps, i % 2, i) for i in range(5)]
    assert results == [True, True, True, False, False] and ps.version == 4
    assert ps.clock == {0: 2, 1: 2}


def test_a_worker_too_far_ahead_waits_for_the_slowest():
    ps = server(max_steps=10, max_staleness=1)
    push(ps, 0, 0)
    push(ps, 0, 1)  # worker 0 is 2 updates ahead of worker 1 (bound 1)
    pulled = threading.Event()
    threading.Thread(target=lambda: (ps.pull(0), pulled.set()), daemon=True).start()
    time.sleep(0.5)
    assert not pulled.is_set()  # blocked
    push(ps, 1, 0)
    assert pulled.wait(timeout=5)  # released once the slowest caught up to within the bound
