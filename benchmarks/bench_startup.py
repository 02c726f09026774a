"""Start-up of `llmtrain-train`: seconds from the process start to the first step's log line, and to the end of a
1-step `tiny` run, on 1 process and on 2 ranks (torchrun), each repeated; checkouts side by side in one run.

    .venv/bin/python benchmarks/bench_startup.py                        # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_startup.py --checkouts . ../old   # this tree beside another checkout's code

What a launch costs before it trains is most of a short multi-process test (docs/testing.md) and the wait of every
user before a first loss. Each checkout's code runs with this venv (PYTHONPATH and the working folder set to the
checkout). The data is a small prepared stdlib set, made once in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = ["model=tiny", "train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
       "train.eval_windows=2", "train.log_every=1"]


def prepare(folder: Path) -> None:
    subprocess.run([str(BIN / "llmtrain-prepare"), "data=stdlib", f"data.dir={folder}", "data.max_documents=150",
                    "data.vocab_size=1024", "data.tokenizer_sample_documents=100", "data.num_proc=1"],
                   check=True, capture_output=True, cwd=REPO)


def launch(checkout: Path, ranks: int, data: Path, run_dir: Path) -> tuple[float, float]:
    """(seconds to the first step's log line, seconds to the process's end) of one 1-step run."""
    args = ["-m", "llmtrain.cli.train", f"data.dir={data}", f"run.dir={run_dir}", *RUN]
    cmd = [sys.executable, *args] if ranks == 1 else [str(BIN / "torchrun"), "--standalone",
                                                      f"--nproc_per_node={ranks}", *args]
    env = {**os.environ, "PYTHONPATH": str(checkout), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=checkout, env=env)
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and "step 1/1" in line:
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        sys.exit(f"bench_startup: the run in {checkout} failed:\n{''.join(lines[-20:])}")
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkouts", nargs="+", type=Path, default=[REPO], help="folders whose code to time")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="runs per checkout and rank count, interleaved")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(data)
        times: dict[tuple[int, int], list[tuple[float, float]]] = {}
        for repeat in range(args.repeats):  # interleaved: a slower moment of the machine hits every column alike
            for ranks in args.ranks:
                for i, checkout in enumerate(args.checkouts):
                    run_dir = Path(tmp) / f"run-{i}-{ranks}-{repeat}"
                    times.setdefault((i, ranks), []).append(launch(checkout.resolve(), ranks, data, run_dir))
    rows = []
    for (i, ranks), runs in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        first, end = [r[0] for r in runs], [r[1] for r in runs]
        rows.append([str(args.checkouts[i]), ranks, f"{statistics.median(first):.2f}",
                     f"{min(first):.2f}-{max(first):.2f}", f"{statistics.median(end):.2f}"])
    table(f"llmtrain-train, model=tiny, 1 step: seconds from the process start ({args.repeats} runs each, median)",
          ["checkout", "ranks", "to step 1", "range", "to the end"], rows)


if __name__ == "__main__":
    main()
