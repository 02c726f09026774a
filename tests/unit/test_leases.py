"""The async mode's data ledger: units leased, settled, given back and leased again, its checkpoint state, the
updates log a resumed run trims, and the readers' positions that a unit names."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from llmtrain.ps.leases import Leases, UpdateLog


def test_units_are_leased_in_order_and_returned_ones_first_lowest_first():
    leases = Leases(num_workers=3)
    assert leases.lease(0, 2) == [0, 1] and leases.lease(1, 2) == [2, 3] and leases.lease(2, 1) == [4]
    assert leases.settle(0, [0]) and not leases.settle(0, [2])  # worker 0 does not hold unit 2
    assert not leases.settle(1, [3])  # held, but not the next one worker 1 computes
    assert leases.give_back(1) == [2, 3] and not leases.held[1]
    assert leases.lease(2, 3) == [2, 3, 5]  # the returned ones first, then new ones
    assert leases.outstanding([0, 1, 2]) == 1 + 0 + 4


def test_a_churning_run_applies_every_unit_once():
    """Workers that take leases, push some and are lost now and then: the units applied are 0..N-1, each once."""
    rng = random.Random(0)
    leases, budget, applied = Leases(num_workers=4), 500, []
    while len(applied) < budget:
        worker = rng.randrange(4)
        if rng.random() < 0.05:
            leases.give_back(worker)  # lost: what it held goes to the others
            continue
        held = list(leases.held[worker])
        if held and rng.random() < 0.7:
            units = held[:rng.randint(1, len(held))]
            assert leases.settle(worker, units)
            applied += units
        else:
            room = budget - len(applied) - leases.outstanding(range(4))
            leases.lease(worker, max(0, min(rng.randint(1, 4), room)))
    assert sorted(applied) == list(range(budget)) and leases.next_unit == budget


def test_checkpoint_state_returns_what_was_held_and_resumes_it_first():
    leases = Leases(num_workers=2)
    leases.lease(0, 3)
    leases.lease(1, 2)
    assert leases.settle(0, [0, 1])
    leases.give_back(1)
    state = json.loads(json.dumps(leases.state_dict()))  # what a checkpoint keeps
    assert state == {"next_unit": 5, "returned": [2, 3, 4]}
    resumed = Leases(num_workers=2)
    resumed.load_state_dict(state)
    assert resumed.lease(1, 4) == [2, 3, 4, 5]


def test_the_updates_log_of_a_resumed_run_drops_the_lines_past_its_version(tmp_path):
    path = tmp_path / "updates.jsonl"
    log = UpdateLog(path, resumed_version=0)
    for version in (1, 2, 3, 4):
        log.write({"version": version, "worker": 0, "staleness": 0, "leases": [version - 1]})
    log.close()
    with open(path, "a") as f:
        f.write('{"version": 5, "wor')  # torn by a kill
    log = UpdateLog(path, resumed_version=2)  # the checkpoint held version 2
    log.write({"version": 3, "worker": 1, "staleness": 1, "leases": [2]})
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["version"], r["worker"], r["units"]) for r in rows] == [(1, 0, [0]), (2, 0, [1]), (3, 1, [2])]


def test_a_unit_names_the_same_windows_as_the_ranks_of_a_synchronous_step(prepared_small):
    from llmtrain.data.reader import PreparedData

    data = PreparedData(prepared_small)
    one = data.train_reader(16, seed=5, rank=0, world_size=1)
    for rank in range(2):  # step 1 of 2 ranks reads positions 8..15 of the order: units 2 and 3 of 4 sequences
        reader = data.train_reader(16, seed=5, rank=rank, world_size=2)
        reader.next_batch(4)
        x, y = reader.next_batch(4)
        x_at, y_at = one.batch_at(8 + 4 * rank, 4)
        assert torch.equal(x, x_at) and torch.equal(y, y_at)
    assert not np.array_equal(one.batch_at(0, 4)[0].numpy(), one.batch_at(4, 4)[0].numpy())
