"""How long the training loop stops to save a checkpoint: train.checkpoint_async=false against true, side by side.

    .venv/bin/python benchmarks/bench_checkpoint.py --data data/stdlib                  # small and 760m, ~20 minutes
    .venv/bin/python benchmarks/bench_checkpoint.py --data data/stdlib --sizes small    # ~2 minutes

Each size trains on 2 ranks with a checkpoint every few steps, once with each setting. From rank 0's log: per save,
the seconds the loop stopped (a synchronous save: all of it; a background one: the copy to host memory, plus any
wait for the save before it) and the seconds until the checkpoint was complete (its files flushed to the disk and
its marker written). Beside them: the checkpoint's size, the loop's seconds over all steps (saves included: what a
background write costs the steps it overlaps), the largest peak resident memory of a rank (the host copy a
background save keeps), and the tensor files compared byte for byte between the two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

from llmtrain.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZES = {  # a size: its overrides, steps, and a checkpoint every N steps
    "small": (["model=small", "model.block_size=128", "dist.zero_stage=2", "train.micro_batch_size=8",
               "train.global_batch_size=16"], 12, 2),
    "760m": (["model=760m", "model.block_size=256", "dist.zero_stage=3", "dist.activation_checkpointing=true",
              "train.micro_batch_size=1", "train.global_batch_size=2"], 4, 1),
}
SAVED = re.compile(r"checkpoint of step (\d+): ([\d.]+) GB in ([\d.]+) s(?:; the loop stopped ([\d.]+) s of it)?")
WAITED = re.compile(r"waited ([\d.]+) s for the checkpoint being written before the save of step (\d+)")
# Measures the peak resident memory of a command's processes (ranks included): the largest of them.
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); sys.exit(code)")


def train(data: str, run_dir: Path, size: str, background: bool) -> dict:
    overrides, steps, every = SIZES[size]
    args = [f"data.dir={data}", f"run.dir={run_dir}", "precision=fp32", *overrides, f"train.max_steps={steps}",
            f"train.checkpoint_every={every}", "train.keep_checkpoints=1", "train.log_every=1", "train.eval_every=0",
            "train.eval_windows=4", "optim.warmup_steps=1", "run.resume=restart",
            f"train.checkpoint_async={str(background).lower()}"]
    cmd = [sys.executable, "-c", PEAK, str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
           "llmtrain.cli.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{size} checkpoint_async={background} failed:\n{proc.stderr[-3000:]}")
    waits = {int(step): float(s) for s, step in WAITED.findall(proc.stderr)}
    saves = [{"step": int(step), "gb": float(gb), "complete_s": float(total),
              "stopped_s": float(stopped or total) + waits.get(int(step), 0.0)}
             for step, gb, total, stopped in SAVED.findall(proc.stderr)]
    rows = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    loop_s = sum(r["step_time_s"] for r in rows if "step_time_s" in r)
    return {"saves": saves, "loop_s": loop_s, "peak": int(proc.stderr.strip().splitlines()[-1])}


def same_files(a: Path, b: Path) -> str:
    """Whether the newest checkpoints of two runs hold the same tensor files, byte for byte."""
    fa, fb = RunDir(a).newest(), RunDir(b).newest()
    names = sorted(p.relative_to(fa).as_posix() for p in fa.rglob("*.pt"))
    same = all((fa / n).read_bytes() == (fb / n).read_bytes() for n in names)
    return f"{len(names)} files {'identical' if same else 'DIFFER'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data.dir (llmtrain-prepare data=stdlib ...)")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        for size in args.sizes:
            runs = {b: train(args.data, Path(tmp) / f"{size}-{b}", size, b) for b in (False, True)}
            sync, bg = runs[False], runs[True]
            stopped = {b: statistics.median(s["stopped_s"] for s in r["saves"]) for b, r in runs.items()}
            rows.append([size, f"{statistics.median(s['gb'] for s in sync['saves']):.2f}", len(sync["saves"]),
                         f"{stopped[False]:.2f}", f"{stopped[True]:.2f}", f"{stopped[True] / stopped[False]:.1%}",
                         f"{statistics.median(s['complete_s'] for s in bg['saves']):.2f}",
                         f"{sync['loop_s']:.1f} / {bg['loop_s']:.1f}",
                         f"{sync['peak'] / 2**30:.2f} / {bg['peak'] / 2**30:.2f}",
                         same_files(Path(tmp) / f"{size}-False", Path(tmp) / f"{size}-True")])
    table("Checkpoint saves on 2 ranks, fp32: the loop's stop per save (median), synchronous vs in the background",
          ["size", "GB", "saves", "sync stopped s", "async stopped s", "async / sync", "async complete after s",
           "loop s sync / async", "peak GiB per rank sync / async", "tensor files"], rows)


if __name__ == "__main__":
    main()
