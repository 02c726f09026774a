"""Stop requests: Slurm's pre-emption warning (``--signal=USR1@<s>``), ``scancel --signal=USR1``, a time limit's
SIGTERM. The trainer saves a complete checkpoint at the end of the current step and stops; it then leaves a
``PREEMPTED`` file in the run folder (``RunDir.preempted``), which tells a launcher (``slurm/*.sbatch``) to
requeue the job -- the requeued job auto-resumes. A run that finishes, or stops for any other reason, leaves
no such file.
"""

from __future__ import annotations

import json
import logging
import signal
from types import FrameType, TracebackType

from llmtrain.run.rundir import RunDir

log = logging.getLogger("llmtrain")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """While entered, the stop signals set ``requested`` (the signal's number) instead of ending the process.

    ``listen=False`` ignores them: a process whose stop is decided elsewhere (a parameter-server worker) must
    survive a signal that Slurm sends to every process of the job.
    """

    def __init__(self, listen: bool = True) -> None:
        self.listen = listen
        self.requested = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("signal %s: saving a checkpoint at the end of this step, then stopping",
                        signal.Signals(signum).name)
        self.requested = signum

    def install(self) -> StopSignals:
        """Catch the signals from now on (a trainer does so at the start of its set-up: Slurm's warning may
        arrive while the model is being built). Installing twice keeps the first handlers to restore."""
        if not self._previous:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle if self.listen else signal.SIG_IGN)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()


def mark_preempted(run: RunDir, step: int, signum: int) -> None:
    """Say that the run stopped on a signal at ``step`` with a checkpoint, and wants to continue."""
    name = signal.Signals(signum).name if signum else "a stop request"
    run.preempted.write_text(json.dumps({"step": step, "signal": name}) + "\n")


def clear_preempted(run: RunDir) -> None:
    run.preempted.unlink(missing_ok=True)
