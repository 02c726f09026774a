"""`llmtrain-train` with each training step's memory measured on a CPU rank (Linux), for benchmarks/bench_train.py.

    python benchmarks/_step_memory.py data.dir=... run.dir=... [any llmtrain-train override]
    torchrun --standalone --nproc_per_node 2 benchmarks/_step_memory.py ...

Runs the same command as `llmtrain-train`, except that every optimizer step (``Trainer.train_step``: forward,
backward and update of all its micro-batches) is bracketed: as it begins, the process's peak resident set size
(VmHWM) is restarted from the current one (``echo 5 > /proc/self/clear_refs``) and the resident set size is read; as it
ends, VmHWM is read again. Rank 0 prints one line per step to stderr,

    STEP_MEMORY {"step": 2, "start_gb": 0.71, "peak_gb": 1.12, "above_start_gb": 0.41}

``above_start_gb`` is the step's peak above what the rank already held: its activations, their gradients and the
step's transient buffers (and, in the first step only, the optimizer state created then). Memory glibc kept from
earlier steps is in ``start_gb`` and reused, so it does not count as the step's; the peak of a whole run would.
Restarting VmHWM lowers what getrusage reports as the process's peak, so the run's ``peak_mem_gb`` rows count only
from the last step's start; this harness is for measuring, never for training.
"""

from __future__ import annotations

import json
import sys

GB = 2**30


def status_bytes(key: str) -> float:
    """A size from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{key}:"))
    return float(line.split()[1]) * 1024


def restart_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def measured(train_step):
    def step(self):
        restart_peak()
        start = status_bytes("VmRSS")
        outcome = train_step(self)
        peak = status_bytes("VmHWM")
        if self.env.is_main:
            row = {"step": self.step + 1, "start_gb": start / GB, "peak_gb": peak / GB,
                   "above_start_gb": (peak - start) / GB}
            print("STEP_MEMORY", json.dumps(row), file=sys.stderr, flush=True)
        return outcome

    return step


def main() -> None:
    import llmtrain.cli.train as cli  # imports no torch: the tuned allocator's re-execution comes first, as usual

    choose = cli.trainer_class

    def trainer_class(mode):
        cls = choose(mode)
        if not getattr(cls.train_step, "measured", False):
            cls.train_step = measured(cls.train_step)
            cls.train_step.measured = True
        return cls

    cli.trainer_class = trainer_class
    sys.argv = ["llmtrain-train", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
