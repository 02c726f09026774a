"""The broadcast gather (llmtrain/workarounds.py, ``gather_by_broadcast``) without processes: installed
once, and groups of another backend keep DeepSpeed's all-gather. Two real gloo ranks against DeepSpeed's own
all-gather, bitwise: tests/integration/test_gathers_gloo.py."""

from __future__ import annotations

import inspect

import torch.distributed as dist

from llmtrain.workarounds import gather_by_broadcast, install_broadcast_gathers


def test_installed_once(monkeypatch):
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime.zero import stage_1_and_2

    for module in (stage_1_and_2, bf16_optimizer):  # DeepSpeed's own again after this test
        monkeypatch.setattr(module, "all_gather_dp_groups", module.all_gather_dp_groups)
    install_broadcast_gathers()
    first = stage_1_and_2.all_gather_dp_groups
    install_broadcast_gathers()
    assert stage_1_and_2.all_gather_dp_groups is first and first.gathers_by_broadcast
    assert inspect.unwrap(first) is not first and not hasattr(inspect.unwrap(first), "gathers_by_broadcast")


def test_other_backends_keep_deepspeeds_all_gather(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    gather = gather_by_broadcast(lambda *args, **kwargs: calls.append((args, kwargs)))
    gather(["flat"], [["part0", "part1"]], ["group"], 512, allgather_bucket_size=1 << 20)
    assert calls == [((["flat"], [["part0", "part1"]], ["group"], 512), {"allgather_bucket_size": 1 << 20})]
