"""A simulated straggler: one compute rank that really takes longer per micro-batch (``train.slow_rank_factor``).

Both training modes wrap each micro-batch's forward and backward in :meth:`Straggler.micro_batch`; on the slow rank
it measures that compute time (waiting for the device first, on a GPU) and then sleeps ``factor - 1`` times it, so
the rank's pace follows its own real compute, whatever the model or machine. Every other rank runs untouched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class Straggler:
    def __init__(self, factor: float, slow: bool, device: torch.device) -> None:
        self.extra = factor - 1.0 if slow else 0.0
        """Sleep per second of compute."""
        self.device = device
        self.slept_s = 0.0

    def _wait_for_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def micro_batch(self) -> Iterator[None]:
        if not self.extra:
            yield
            return
        self._wait_for_device()
        start = time.perf_counter()
        yield
        self._wait_for_device()
        pause = self.extra * (time.perf_counter() - start)
        time.sleep(pause)
        self.slept_s += pause
