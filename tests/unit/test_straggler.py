"""The simulated straggler (train.slow_rank_factor): the slow rank's micro-batch takes factor times its compute."""

from __future__ import annotations

import time

import torch

from llmtrain.run.straggler import Straggler


def timed(straggler: Straggler, compute_s: float) -> float:
    start = time.perf_counter()
    with straggler.micro_batch():
        time.sleep(compute_s)  # the micro-batch's forward and backward
    return time.perf_counter() - start


def test_the_slow_rank_takes_factor_times_its_compute_and_the_others_none_more():
    cpu = torch.device("cpu")
    slow, other, plain = Straggler(3.0, True, cpu), Straggler(3.0, False, cpu), Straggler(1.0, True, cpu)
    assert 0.29 <= timed(slow, 0.1) <= 0.45 and 0.19 <= slow.slept_s <= 0.3
    assert timed(other, 0.1) < 0.15 and other.slept_s == 0
    assert timed(plain, 0.1) < 0.15 and plain.slept_s == 0


def test_a_factor_below_one_or_nan_is_refused_in_one_line():
    from llmtrain.config import TrainLoopConfig

    for bad in (0.5, float("nan")):
        try:
            TrainLoopConfig(slow_rank_factor=bad)
        except Exception as exc:  # the config's one-line refusal
            assert f"train.slow_rank_factor={bad} must be between 1 and 1000" in str(exc)
        else:
            raise AssertionError(f"slow_rank_factor={bad} accepted")
