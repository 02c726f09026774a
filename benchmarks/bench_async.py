"""Asynchronous parameter servers against synchronous ZeRO, measured side by side in one run.

    .venv/bin/python benchmarks/bench_async.py --data data/stdlib            # ~15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_async.py --data data/stdlib --precisions fp32 bf16 --model mini --skip loss

1. updates/s and tokens/s with 1 and 2 workers (+1 server), beside sync ZeRO-2 on 1 and 2 ranks at the same
   global batch and precision; bytes moved per update against the minimum (a pull and a push of every
   parameter in the run's precision: 4 bytes each in fp32, 2 in bf16).
2. validation loss at equal tokens: sync, async, and async with the staleness-aware learning rate
   (llmtrain-compare's runs, the demo's model and batch, fp32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

from llmtrain.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
BATCH = ["model.block_size=128", "train.global_batch_size=16", "train.micro_batch_size=8", "optim.lr=2e-3",
         "optim.warmup_steps=30", "wandb.mode=disabled"]
BYTES = {"fp32": 4, "bf16": 2}


def train(data: str, run_dir: Path, procs: int, steps: int, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
           "llmtrain.cli.train", f"data.dir={data}", f"run.dir={run_dir}", *BATCH, f"train.max_steps={steps}",
           "train.log_every=5", "train.eval_every=0", "train.eval_windows=100", "train.checkpoint_every=0",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{run_dir.name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]


def num_params(run: RunDir) -> int:
    from safetensors import safe_open

    with safe_open(str(run.newest() / "model.safetensors"), "pt") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()))


def throughput(data: str, work: Path, steps: int, model: str, precisions: list[str]) -> None:
    rows = []
    for precision in precisions:
        for workers in (1, 2):
            common = [f"model={model}", f"precision={precision}"]
            name = f"{precision}-{workers}"
            sync = [r for r in train(data, work / f"sync-{name}", workers, steps, *common, "dist.zero_stage=2")
                    if "loss" in r]
            ps = [r for r in train(data, work / f"ps-{name}", workers + 1, steps, *common, "mode=async_ps")
                  if "loss" in r]
            minimum = 2 * BYTES[precision] * num_params(RunDir(work / f"ps-{name}"))  # a pull + a push
            moved = np.mean([r["bytes_per_update"] for r in ps[1:]])
            rows.append([precision, workers, f"{np.mean([r['updates_per_s'] for r in ps[1:]]):.2f}",
                         f"{np.mean([r['tokens_per_s'] for r in ps[1:]]):,.0f}",
                         f"{np.mean([r['tokens_per_s'] for r in sync[1:]]):,.0f}",
                         f"{moved / 2**20:.2f} MiB", f"{minimum / 2**20:.2f} MiB", f"{moved / minimum:.3f}",
                         f"{np.mean([r['pull_s'] for r in ps[1:]]) * 1e3:.0f} / "
                         f"{np.mean([r['push_s'] for r in ps[1:]]) * 1e3:.0f} ms"])
    table(f"1. {model} (block 128, global batch 16), {steps} steps; first logged interval left out",
          ["precision", "workers", "async updates/s", "async tokens/s", "sync ZeRO-2 tokens/s (same ranks)",
           "bytes/update", "minimum", "ratio", "pull / push"], rows)


def loss_at_equal_tokens(data: str, work: Path, steps: int) -> None:
    from llmtrain.compare import ModeRun, launch

    common = [f"data.dir={data}", "model=small", "precision=fp32", *BATCH, f"train.max_steps={steps}",
              "train.log_every=10",
              f"train.eval_every={steps}", "train.eval_windows=100", "train.checkpoint_every=0"]
    runs = [ModeRun("sync ZeRO-2", RunDir(work / "c-sync"), ["mode=sync", "dist.zero_stage=2"], 2),
            ModeRun("async", RunDir(work / "c-async"), ["mode=async_ps"], 3),
            ModeRun("async + staleness-aware lr", RunDir(work / "c-slr"), ["mode=async_ps", "ps.staleness_lr=true"],
                    3)]
    rows = []
    for run in runs:
        launch(run, common)
        final, steps_rows = run.evals()[-1], run.steps()
        stale = np.mean([r["staleness_mean"] for r in steps_rows]) if "staleness_mean" in steps_rows[-1] else 0
        rows.append([run.name, f"{steps_rows[-1]['tokens_seen']:,}", f"{final['val_loss']:.4f}",
                     f"{final['val_ppl']:.1f}", f"{run.wall_s:.0f}", f"{stale:.2f}"])
    table("2. validation loss at equal tokens (2 compute ranks; async adds 1 server)",
          ["mode", "tokens", "val loss", "val ppl", "wall s", "mean staleness"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data.dir (llmtrain-prepare data=stdlib ...)")
    parser.add_argument("--steps", type=int, default=30, help="steps of the throughput runs")
    parser.add_argument("--loss-steps", type=int, default=100, help="steps of the equal-token loss runs")
    parser.add_argument("--model", default="small", help="the model preset of the throughput runs")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=sorted(BYTES),
                        help="precisions of the throughput runs (bf16 is slow on CPUs without native bf16)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "loss"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:  # run folders, each with its last checkpoint
        work = Path(tmp)
        if "throughput" not in args.skip:
            throughput(args.data, work, args.steps, args.model, args.precisions)
        if "loss" not in args.skip:
            loss_at_equal_tokens(args.data, work, args.loss_steps)


if __name__ == "__main__":
    main()
