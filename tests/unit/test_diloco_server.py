"""DiLoCo's servers on their own (no RPC): the outer optimizers, sync rounds with deterministic leases, a worker lost
mid-round, and evaluations that hold the next round."""

from __future__ import annotations

import time

import pytest
import torch

from llmtrain.config import DataConfig, Decay, OptimConfig, PSConfig, RunConfig
from llmtrain.optim import DelayedNesterov, build_outer_optimizer
from llmtrain.ps.server import OuterServer, RoundServer

ADAM = OptimConfig(warmup_steps=0, decay=Decay.constant)


@pytest.mark.parametrize("activation", [0.0, 0.5])
def test_delayed_nesterov_with_one_worker_is_nesterov_sgd_bit_for_bit(activation):
    """N = 1 (the buffer of one worker): every update moves the momentum, with all of it applied, for any c."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    delayed = build_outer_optimizer(PSConfig(sync_rounds=False, momentum_activation=activation), [a], num_workers=1)
    nesterov = torch.optim.SGD([b], lr=0.7, momentum=0.9, nesterov=True)
    assert isinstance(delayed, DelayedNesterov)
    for _ in range(6):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        delayed.step()
        nesterov.step()
    assert torch.equal(a, b)


def test_delayed_nesterov_moves_the_momentum_once_per_buffer_on_its_mean():
    """N = 2, c = 0: the first update of a window is plain SGD on g / N, the second applies the momentum of the
    window's mean, so the window moves θ by one Nesterov step on the mean (the paper's Algorithm 3)."""
    lr, beta = 0.5, 0.9
    p = torch.nn.Parameter(torch.zeros(1))
    opt = DelayedNesterov([p], lr, beta, buffer=2, activation=0.0)
    m, theta = 0.0, 0.0
    for g1, g2 in ((1.0, 3.0), (-2.0, 4.0)):
        p.grad = torch.tensor([g1])
        opt.step()
        theta -= lr * g1 / 2
        assert p.item() == pytest.approx(theta)  # no momentum between momentum updates (c = 0)
        p.grad = torch.tensor([g2])
        opt.step()
        m = beta * m + (g1 + g2) / 2
        theta -= lr * (beta * m + g2 / 2)
        assert p.item() == pytest.approx(theta)


def test_momentum_activation_above_one_over_n_is_refused():
    with pytest.raises(ValueError, match="at most 1/N"):
        DelayedNesterov([torch.nn.Parameter(torch.zeros(1))], 0.7, 0.9, buffer=4, activation=0.5)


def round_server(workers: int = 2, inner_steps: int = 2, max_steps: int = 4, **kwargs) -> RoundServer:
    ps = PSConfig(algorithm="diloco", inner_steps=inner_steps, outer_lr=1.0, outer_momentum=0.0)
    server = RoundServer({"w": torch.zeros(3)}, ADAM, max_steps, workers, False, outer=ps, **kwargs)
    server.start()
    return server


def push(server: RoundServer, worker: int, units: list[int], delta: float) -> None:
    stats = {"loss": 1.0, "unit_losses": [1.0] * len(units), "leases": units, "pull_s": 0.0, "push_s": 0.0,
             "bytes": 0, "compute_s": 0.0}
    server.push(worker, {"w": torch.full((3,), delta)}, server.version, stats)


def test_sync_rounds_lease_slots_in_worker_order_and_average_the_round():
    """Slot w of round r is worker w's whoever asks first; the round's outer step (lr 1, no momentum) applies the
    mean pseudo-gradient once both arrived, and only then are the next round's leases handed out."""
    server = round_server()
    assert server.grant(1, 2) == [2, 3] and server.grant(0, 2) == [0, 1]
    push(server, 1, [2, 3], 4.0)
    assert server.version == 0 and server.grant(1, 2) == []  # the round is open: nothing applied, nothing leased
    push(server, 0, [0, 1], 2.0)
    assert server.version == 4 and torch.equal(server.params["w"].detach(), torch.full((3,), -3.0))
    assert server.grant(0, 2) == [4, 5] and server.grant(1, 2) == [6, 7]
    assert [r["worker"] for r in server.records] == [0, 1] and len({r["time"] for r in server.records}) == 1
    push(server, 0, [4, 5], 0.0)
    push(server, 1, [6, 7], 0.0)
    assert server.version == server.budget == 8 and server.wait_grant(0, 2, 0.1) == []


def test_a_worker_lost_mid_round_leaves_the_round_to_the_others_and_its_units_to_the_next():
    server = round_server(timeout_s=0.3)
    assert server.grant(0, 2) == [0, 1] and server.grant(1, 2) == [2, 3]
    push(server, 0, [0, 1], 2.0)
    time.sleep(0.4)  # worker 1 is silent past the timeout: lost
    assert server.wait_grant(0, 2, 1.0) == [2, 3]  # its units, leased again first, in the next round
    assert server.version == 2 and torch.equal(server.params["w"].detach(), torch.full((3,), -2.0))  # worker 0's
    push(server, 0, [2, 3], 0.0)
    assert server.wait_grant(0, 2, 1.0) == [4, 5]
    push(server, 0, [4, 5], 0.0)
    assert server.wait_grant(0, 2, 1.0) == [6, 7]
    push(server, 0, [6, 7], 0.0)
    assert server.wait_grant(0, 2, 0.1) == [] and server.version == 8
    applied = sorted(u for r in server.records for u in r["leases"])
    assert applied == list(range(8))  # every unit of the budget once


def test_a_round_ending_at_an_evaluation_holds_the_next_until_it_is_done():
    """The reporting thread evaluates and saves the weights of the round that ended at that step: the next round's
    leases wait for it (``proceed``)."""
    server = round_server(holds=lambda step: step == 2)  # round 0 (2 workers x 2 units) ends at step 2
    server.grant(0, 2), server.grant(1, 2)
    push(server, 0, [0, 1], 1.0)
    push(server, 1, [2, 3], 1.0)
    assert server.version == 4 and server.grant(0, 2) == [] and server.grant(1, 2) == []
    server.proceed(2)
    assert server.grant(0, 2) == [4, 5] and server.grant(1, 2) == [6, 7]


def test_asynchronous_rounds_apply_each_pseudo_gradient_on_arrival_and_keep_the_inner_state():
    ps = PSConfig(algorithm="diloco", inner_steps=2, outer_lr=1.0, outer_momentum=0.0, sync_rounds=False)
    server = OuterServer({"w": torch.zeros(3)}, ADAM, 4, 2, False, outer=ps)
    server.start()
    assert server.grant(0, 2) == [0, 1] and server.grant(1, 2) == [2, 3]
    stats = {"loss": 1.0, "leases": [2, 3], "pull_s": 0.0, "push_s": 0.0, "bytes": 0, "compute_s": 0.0,
             "inner_state": {"state": {0: {"exp_avg": torch.ones(3)}}}}
    assert server.push(1, {"w": torch.full((3,), 2.0)}, 0, stats, wanted=2) == [4, 5]
    assert server.version == 2 and server.inner_state(1)["state"][0]["exp_avg"].sum() == 3
    # N = 2 workers buffered, c = 0: the first of a window moves θ by lr * g / N
    assert torch.equal(server.params["w"].detach(), torch.full((3,), -1.0))
    assert "inner_state" not in server.records[0] and set(server.state_dict()["inner"]) == {1}


def test_a_servers_predicted_memory_counts_the_outer_state_and_the_round():
    """Per fp32 parameter of the shard: Downpour's AdamW keeps 4 (weights) + 8 (moments); DiLoCo's sync rounds 4 + 4
    (outer momentum) + 4 per worker (the round's pseudo-gradients); async rounds 4 + 8 (momentum, Delayed Nesterov's
    sum); server 0 under DiLoCo also every worker's inner state over the whole model; background saves add a copy
    of all but the round."""
    from llmtrain.config import TrainConfig, TrainLoopConfig
    from llmtrain.distributed.memory import server_bytes

    def total(model_params: int = 0, **ps) -> float:
        cfg = TrainConfig(data=DataConfig(dir="d"), run=RunConfig(dir="r"), mode="async_ps",
                          train=TrainLoopConfig(max_steps=16, eval_every=16, checkpoint_every=16,
                                                checkpoint_async=False), ps=PSConfig(**ps))
        return sum(server_bytes(cfg, 1000, num_workers=3, model_params=model_params).values())

    assert total() == total(model_params=2000) == 12_000  # Downpour keeps no inner state
    assert total(algorithm="diloco", inner_steps=4) == 4_000 + 4_000 + 12_000
    assert total(algorithm="diloco", inner_steps=4, sync_rounds=False) == 12_000
    # server 0 keeps the 3 workers' inner AdamW moments over the whole model (2000 parameters): 3 x 8 x 2000
    assert total(model_params=2000, algorithm="diloco", inner_steps=4) == 20_000 + 48_000


def test_a_stop_request_ends_the_run_at_a_round_boundary():
    """A stop signal asks for a budget two steps on: rounded up to whole rounds (W x H units), and never below the
    round already leased."""
    server = round_server(max_steps=8)  # 2 workers x 2 inner steps: rounds of 4 units
    assert server.grant(0, 2) == [0, 1] and server.grant(1, 2) == [2, 3]
    assert server.stop_at(1) == 4  # the open round is promised
    push(server, 0, [0, 1], 0.0)
    push(server, 1, [2, 3], 0.0)
    assert server.version == 4 and server.wait_grant(0, 2, 0.1) == []


def test_sync_bytes_per_token_follow_one_convention_with_the_parameter_servers():
    """Sent + received per data-parallel rank per step, ring collectives: at 2 ranks ZeRO-2 without accumulation
    moves 2 Ψ b (a reduce-scatter and an all-gather) -- what a Downpour worker moves per local step (a pull and a
    push); ZeRO-2 adds a reduce-scatter per extra micro-batch, ZeRO-0 all-reduces once."""
    from llmtrain.distributed.traffic import data_parallel_bytes_per_step as per_step

    psi = 1000
    assert per_step(psi, 2, 2, accumulation=1, dtype_bytes=2) == 2 * psi * 2
    assert per_step(psi, 2, 2, accumulation=3, dtype_bytes=2) == 4 * psi * 2
    assert per_step(psi, 4, 0, accumulation=3, dtype_bytes=4) == 2 * 2 * 3 / 4 * psi * 4
    assert per_step(psi, 1, 2, accumulation=1, dtype_bytes=4) == 0
