"""Pipeline parallel on 2 ranks, measured side by side in one run (CPU here; the same script runs on GPUs).

    .venv/bin/python benchmarks/bench_pipeline.py --data data/stdlib      # ~10 minutes on 2 cores

0. Exactly the 1-process model: `tiny` fp32, 20 steps (global batch 8, micro-batch 2), each layout against one process
   (DualPipeV with 4 blocks, against a 4-block process): the largest relative gap in losses, gradient norms and
   validation losses over the 20 steps; a PP = 2 checkpoint of step 10 resumed on 1 rank and on 2 data-parallel
   ranks, and a 2-rank ZeRO-1 checkpoint resumed at PP = 2, against the uninterrupted runs.
1. Memory per rank, `350m` fp32 (block 256, micro-batch 1, activation checkpointing; benchmarks/_memory_probe.py):
   ZeRO-1 over 2 data-parallel ranks against 2 pipeline stages (ZeRO-1 over 1), the same global batch of 2
   sequences. Peak resident memory per rank as the operating system counts it, its baseline, the state tensors,
   llmtrain's start-up prediction, s/step.
2. The bubble, `small` (6 blocks) fp32, block 128, micro-batch 2, ZeRO-0 (benchmarks/_pipeline_probe.py): 1F1B and
   DualPipeV at 4 and 8 micro-batches per step. Per rank, the share of a step spent waiting (the step less its
   forward and backward passes and its other work: sends and receives that block, idle time) beside 1F1B's
   (p - 1) / (m + p - 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
GB = 2**30


def launch(script: str, *args: str) -> list[dict]:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "benchmarks" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


TINY = ["model=tiny", "train.max_steps=20", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=10", "train.eval_windows=40", "train.checkpoint_every=10",
        "optim.warmup_steps=5", "optim.lr=3e-3", "precision=fp32"]


def train(data: str, run_dir: Path, ranks: int, *overrides: str) -> dict[int, dict]:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "llmtrain.cli.train",
           f"data.dir={data}", f"run.dir={run_dir}", *TINY, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def slug(name: str) -> str:
    """A folder name for a layout's name (a Hydra override value takes no '=' or ',')."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def gaps(ours: dict[int, dict], theirs: dict[int, dict]) -> list[str]:
    out = []
    for key in ("loss", "grad_norm", "val_loss"):
        pairs = [(ours[s][key], theirs[s][key]) for s in theirs if key in theirs[s] and key in ours.get(s, {})]
        out.append(f"{max(abs(a - b) / abs(b) for a, b in pairs):.1e}" if pairs else "-")
    return out


def equivalence(data: str, work: Path) -> None:
    one = {"2": train(data, work / "one", 1, "dist.zero_stage=0"),
           "4": train(data, work / "one4", 1, "dist.zero_stage=0", "model.n_layer=4")}
    rows = []
    layouts = [("PP=2, ZeRO-0", 2, ["dist.pipeline_parallel=2", "dist.zero_stage=0"], "2"),
               ("PP=2, ZeRO-1", 2, ["dist.pipeline_parallel=2", "dist.zero_stage=1"], "2"),
               ("PP=2 x DP=2, ZeRO-0, activation checkpointing", 4,
                ["dist.pipeline_parallel=2", "dist.zero_stage=0", "dist.activation_checkpointing=true"], "2"),
               ("PP=2 x DP=2, ZeRO-1", 4, ["dist.pipeline_parallel=2", "dist.zero_stage=1"], "2"),
               ("DualPipeV, PP=2, ZeRO-0, 4 blocks", 2,
                ["dist.pipeline_parallel=2", "dist.pipeline_schedule=dualpipev", "dist.zero_stage=0",
                 "model.n_layer=4"], "4"),
               ("TP=2, ZeRO-0 (the one norm)", 2, ["dist.tensor_parallel=2", "dist.zero_stage=0"], "2"),
               ("SP=2, ZeRO-0 (the one norm)", 2, ["dist.sequence_parallel=2", "dist.zero_stage=0"], "2")]
    for name, ranks, overrides, reference in layouts:
        rows.append([name, ranks, *gaps(train(data, work / slug(name), ranks, *overrides), one[reference])])
    # resumes across layouts: step 10's checkpoint, the rest of the run in another layout
    pp2 = work / slug("PP=2, ZeRO-1")
    whole = train(data, work / "z1-2", 2, "dist.zero_stage=1")
    for name, source, ranks, overrides, reference in [
            ("PP=2 -> 1 rank (ZeRO-1)", pp2, 1, ["dist.zero_stage=1"], one["2"]),
            ("PP=2 -> DP=2 (ZeRO-1)", pp2, 2, ["dist.zero_stage=1"], one["2"]),
            ("DP=2 -> PP=2 (ZeRO-1)", work / "z1-2", 2, ["dist.zero_stage=1", "dist.pipeline_parallel=2"], whole)]:
        moved = work / f"moved-{slug(name)}"
        shutil.copytree(source, moved)
        shutil.rmtree(moved / "checkpoints" / "step_00000020")
        resumed = train(data, moved, ranks, *overrides)
        rows.append([name, ranks, *gaps({s: r for s, r in resumed.items() if s > 10},
                                        {s: r for s, r in reference.items() if s > 10})])
    table("0. against one process, tiny fp32, 20 steps: largest relative gap",
          ["layout", "ranks", "loss", "grad norm", "val loss"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared data folder (llmtrain-prepare)")
    parser.add_argument("--memory-model", default="350m", help="table 1's model preset (conf/model/)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--bubble-steps", type=int, default=6)
    parser.add_argument("--skip", nargs="*", default=[], choices=["equivalence", "memory", "bubble"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    if "equivalence" not in args.skip:
        equivalence(args.data, work)
    if "memory" not in args.skip:
        rows = []
        for name, pp in (("ZeRO-1, 2 data-parallel ranks", "1"), ("ZeRO-1, 2 pipeline stages", "2")):
            for r in launch("_memory_probe.py", args.data, str(work / f"mem{pp}"), "1", args.memory_model,
                            str(args.memory_steps), pp):
                rows.append([name, r["rank"], f"{r['psi'] / 1e6:.0f}M", f"{r['baseline'] / GB:.2f}",
                             f"{r['peak'] / GB:.2f}", f"{(r['peak'] - r['baseline']) / GB:.2f}",
                             f"{r['states'] / GB:.2f}", f"{r['predicted'] / GB:.2f}", f"{r['step_s']:.1f}"])
        table(f"1. memory per rank, {args.memory_model} fp32, 2 ranks (GiB)",
              ["layout", "rank", "params held", "baseline", "peak", "peak - baseline", "state tensors", "predicted",
               "s/step"], rows)
    if "bubble" not in args.skip:
        rows = []
        for schedule in ("1f1b", "dualpipev"):
            for m in (4, 8):
                for r in launch("_pipeline_probe.py", args.data, str(work / f"{schedule}{m}"), schedule, str(m),
                                str(args.bubble_steps)):
                    rows.append([schedule, m, r["rank"], f"{r['step_s']:.3f}", f"{r['compute_s']:.3f}",
                                 f"{r['other_s']:.3f}", f"{r['wait_s'] / r['step_s']:.2f}", f"{1 / (m + 1):.2f}"])
        table("2. the bubble, small fp32, 2 stages (s per step; wait share of the step)",
              ["schedule", "micro-batches", "rank", "step", "forward+backward", "other work", "wait share",
               "1F1B (p-1)/(m+p-1)"], rows)


if __name__ == "__main__":
    main()
