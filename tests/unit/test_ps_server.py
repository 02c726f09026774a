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


def push(ps: ParameterServer, worker: int, version: int, units: int = 1, wanted: int = 1, loss: float = 1.0) -> int:
    """Push ``units`` local steps of the units ``worker`` holds (leased first where it holds fewer, past the budget
    check: as a worker that was granted them); how many units it is leased next."""
    held = list(ps.leases.held[worker])
    if len(held) < units:
        held += ps.leases.lease(worker, units - len(held))
    stats = {"loss": loss, "pull_s": 0.0, "push_s": 0.0, "bytes": 0, "leases": held[:units]}
    return len(ps.push(worker, {"w": torch.ones(2, 2)}, version, stats, wanted))


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
    results = [push(ps, i % 2, i) for i in range(5)]  # each push asks for one more local step
    assert results == [1, 1, 0, 0, 0] and ps.version == 4  # the fifth was never granted: not applied
    assert ps.clock == {0: 2, 1: 2}


def test_grants_spend_the_budget_exactly_and_a_lost_workers_grant_returns():
    ps = server(max_steps=3, timeout_s=0.5)  # 6 local steps for 2 workers
    assert ps.grant(0, 4) == [0, 1, 2, 3] and ps.grant(1, 4) == [4, 5]  # what is left beyond the other's lease
    assert push(ps, 0, 0, units=4, wanted=4) == 0  # one update of 4 local steps; the rest is promised to worker 1
    assert ps.version == 4 and ps.clock == {0: 4, 1: 0}
    assert torch.equal(ps.pull(0)[1]["w"], torch.full((2, 2), -0.5))  # one SGD step, whatever its size
    time.sleep(0.6)  # worker 1 falls silent for longer than the timeout: its lease returns
    assert ps.grant(0, 4) == [4, 5] and ps.version + len(ps.leases.held[0]) == ps.budget
    stats = {"loss": 1.0, "pull_s": 0.0, "push_s": 0.0, "bytes": 0, "leases": [4, 5]}
    assert ps.push(1, {"w": torch.ones(2, 2)}, 4, stats) == [] and ps.version == 4  # worker 1 comes back: refused
    assert push(ps, 0, 4, units=2) == 0 and ps.version == ps.budget


def test_a_worker_out_of_grants_waits_for_the_budget_another_holds():
    ps = server(max_steps=2, timeout_s=5)  # 4 local steps for 2 workers
    assert len(ps.grant(0, 2)) == 2 and len(ps.grant(1, 2)) == 2
    assert push(ps, 0, 0, units=2, wanted=2) == 0  # the rest is worker 1's
    assert ps.wait_grant(0, 2, seconds=0.2) is None  # worker 1 is live: ask again
    pushed = threading.Timer(0.1, push, args=(ps, 1, 0, 2, 0))
    pushed.start()
    assert ps.wait_grant(0, 2, seconds=5) == [] and ps.version == ps.budget  # applied: worker 0 stops
    pushed.join()

    ps = server(max_steps=2, timeout_s=0.5)
    assert ps.grant(0, 2) == [0, 1] and ps.grant(1, 2) == [2, 3]
    push(ps, 0, 0, units=2, wanted=0)
    start = time.monotonic()
    assert ps.wait_grant(0, 2, seconds=5) == [2, 3]  # worker 1 is lost (silent past the timeout): its lease returns
    assert 0.3 < time.monotonic() - start < 2


def test_an_update_of_several_local_steps_ends_the_steps_it_covers():
    ps = server(max_steps=4, max_nonfinite_steps=2)
    push(ps, 0, 0, units=3)  # steps 1 (ended) and half of 2
    assert ps.version == 3 and ps.skipped_steps == 0
    push(ps, 1, 0, units=3, loss=float("nan"))  # ends step 2 (skipped) and step 3 (skipped): two in a row
    assert ps.skipped_steps == 2 and ps.diverged == (2, 3) and ps.budget == 6


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


def test_a_worker_waiting_for_a_lease_holds_no_one_back():
    """At the end of the budget the slower worker waits for a lease while the faster holds the last ones: the
    faster one's pull must not wait for it (max_staleness), or both would wait for ever."""
    ps = server(max_steps=3, max_staleness=1, timeout_s=30)  # 6 local steps
    assert ps.grant(0, 5) == [0, 1, 2, 3, 4] and ps.grant(1, 1) == [5]
    push(ps, 1, 0, wanted=0)  # worker 1 is done with its lease; the rest is worker 0's
    waiting = threading.Thread(target=ps.wait_grant, args=(1, 1, 10.0), daemon=True)
    waiting.start()
    for version in range(1, 5):
        push(ps, 0, version, wanted=0)  # worker 0 runs 4 updates ahead of worker 1
        assert ps.pull(0)[0] == version + 1  # not held back by the idle worker 1
    push(ps, 0, 5, wanted=0)
    waiting.join(timeout=5)
    assert not waiting.is_alive() and ps.version == ps.budget


def test_bf16_pulls_and_pushes_move_half_the_bytes_and_masters_stay_fp32():
    adam = OptimConfig(lr=1e-2, warmup_steps=0, decay=Decay.constant, weight_decay=0.0)
    weights = {"w": torch.randn(4, 8), "b": torch.randn(8)}
    fp32 = ParameterServer(weights, adam, max_steps=5, num_workers=1, staleness_lr=False)
    bf16 = ParameterServer(weights, adam, max_steps=5, num_workers=1, staleness_lr=False,
                           wire_dtype=torch.bfloat16)
    _, full = fp32.pull(0)
    _, half = bf16.pull(0)
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors.values())  # noqa: E731
    assert size(half) * 2 == size(full) and all(t.dtype == torch.bfloat16 for t in half.values())
    grads = {n: torch.randn_like(t) for n, t in weights.items()}
    stats = {"loss": 1.0, "pull_s": 0.0, "push_s": 0.0, "bytes": 0}
    fp32.push(0, {n: g.bfloat16().float() for n, g in grads.items()}, 0, {**stats, "leases": fp32.grant(0, 1)})
    bf16.push(0, {n: g.bfloat16() for n, g in grads.items()}, 0, {**stats, "leases": bf16.grant(0, 1)})
    # the bf16 gradient is applied to fp32 masters in fp32: exactly the fp32 server fed the same values
    assert all(p.dtype == torch.float32 for p in bf16.params.values())
    assert all(torch.equal(bf16.params[n], fp32.params[n]) for n in weights)
    assert all(isinstance(g["params"], list) for g in bf16.optimizer.param_groups)
    assert [len(g["params"]) for g in bf16.optimizer.param_groups] == [1, 1]  # [decay, no_decay], as optim.py


def test_worker_sums_micro_batches_in_fp32_and_clips_like_torch():
    from llmtrain.ps.grads import accumulate_fp32, clip_

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    xs = [torch.randn(3, 8) for _ in range(3)]
    for x in xs:  # autograd's own accumulation, then torch's clipping
        (model(x).pow(2).mean() / 3).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    params, sums = dict(model.named_parameters()), {}
    for x in xs:
        (model(x).pow(2).mean() / 3).backward()
        accumulate_fp32(params, sums)
    clip_(list(sums.values()), 0.05)
    assert all(torch.equal(sums[n], expected[n]) for n in expected)  # fp32: bitwise what torch gives
    assert all(p.grad is None for p in model.parameters())
    half, half_sums = model.to(torch.bfloat16), {}
    for x in xs:
        (half(x.bfloat16()).float().pow(2).mean() / 3).backward()
        accumulate_fp32(dict(half.named_parameters()), half_sums)
    assert all(s.dtype == torch.float32 for s in half_sums.values())


def test_other_servers_refuse_what_server_0_took_back_and_server_0_tells_them_first():
    first, other = server(timeout_s=0.3), server(owns_data_order=False)
    told = []
    first.on_give_back = lambda worker, units: (told.append((worker, units)), other.revoke(worker, units))
    assert first.grant(1, 2) == [0, 1]
    time.sleep(0.4)  # worker 1 is lost
    assert first.grant(0, 2) == [0, 1] and told == [(1, [0, 1])]  # told before leasing the units again
    stats = {"loss": 1.0, "pull_s": 0.0, "push_s": 0.0, "bytes": 0, "leases": [0, 1]}
    assert other.push(1, {"w": torch.ones(2, 2)}, 0, stats, wanted=0) == [] and other.version == 0  # refused
    assert other.push(0, {"w": torch.ones(2, 2)}, 0, stats, wanted=0) == [] and other.version == 2  # applied


def test_a_direct_write_is_the_staged_copys_file_and_hands_its_buffers_back(tmp_path):
    ps = server()
    version, _ = ps.pull(0)
    push(ps, 0, version)
    ps.stage()  # a background save's copy, kept in host buffers
    torch.save(ps.staged, tmp_path / "ps0.pt")
    staged = (tmp_path / "ps0.pt").read_bytes()
    assert ps.copies.nbytes > 0
    ps.write(str(tmp_path / "ps0.pt"))  # the run's last save: the state as it is, no copy
    assert (tmp_path / "ps0.pt").read_bytes() == staged and ps.copies.nbytes == 0 and ps.staged is None
