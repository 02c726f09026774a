"""When a training loop logs, evaluates, saves and stops: one answer for every mode, the last step included."""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.config import TrainLoopConfig


@dataclass(frozen=True)
class Cadence:
    """Asked once per step (1-based, after the step's update). A run ends at ``max_steps`` or, early, at
    ``stop_at_step`` or at the step where a stop signal was seen: both ends evaluate where the schedule says so and
    always save."""

    max_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    stop_at_step: int = 0

    @classmethod
    def of(cls, cfg: TrainLoopConfig) -> Cadence:
        return cls(cfg.max_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every, cfg.stop_at_step)

    def is_last(self, step: int) -> bool:
        """The run's planned end."""
        return step == self.max_steps

    def stops(self, step: int, signalled: bool = False) -> bool:
        """The run ends at this step: planned, at ``stop_at_step``, or on a stop signal."""
        return self.is_last(step) or signalled or step == self.stop_at_step

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or self.is_last(step)

    def evaluate(self, step: int) -> bool:
        return self.is_last(step) or (self.eval_every > 0 and step % self.eval_every == 0)

    def save(self, step: int, signalled: bool = False) -> bool:
        return self.stops(step, signalled) or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)


@dataclass
class NonfiniteStreak:
    """Steps in a row whose loss was non-finite (each one skipped): a run ends at ``limit`` of them, in every mode
    (``llmtrain.run.checkpoint.diverged`` says how)."""

    limit: int
    first: int = 0
    """The first step of the current streak."""
    count: int = 0

    def add(self, step: int, finite: bool) -> bool:
        """Count ``step``; True when it is the ``limit``-th non-finite step in a row."""
        if finite:
            self.count = 0
            return False
        if self.count == 0:
            self.first = step
        self.count += 1
        return self.count >= self.limit
