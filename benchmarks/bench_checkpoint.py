"""What a checkpoint save costs the training loop: its stop per save and its memory, by how it is written.

    .venv/bin/python benchmarks/bench_checkpoint.py --data data/stdlib                        # ~35 minutes
    .venv/bin/python benchmarks/bench_checkpoint.py --data data/stdlib --sizes small          # ~2 minutes

Each size trains on 2 ranks, fp32, with a checkpoint every few steps, once per mode:
- ``sync``: train.checkpoint_async=false, the loop waits for every save;
- ``whole``: in the background with a whole host copy (train.checkpoint_buffer_gb=null);
- ``bounded``: in the background with the default bounded buffer (train.checkpoint_buffer_gb=1.0): the largest files
  that fit are copied, the others written from the live tensors before the next update.
``--final`` adds the runs that save only at their end (train.checkpoint_every=0) with every other setting at its
default, at ZeRO-2 and ZeRO-3: a run's last save is written directly.

From rank 0's log, per save: the seconds the loop stopped (a synchronous save: all of it; a background one: the
snapshot, plus any wait for the save before it and, before the next update, for the live tensors to be written) and
the seconds until the checkpoint was complete; the run's last save, written directly in every mode, is left out of
the background modes' figures. Beside them: the loop's seconds over all steps, the largest peak resident memory of a
rank against the ZeRO paper's formula for fp32 Adam (16Ψ/N at ZeRO-3, 4Ψ + 12Ψ/N at ZeRO-2; peak minus rank 0's
process baseline), the peak llmtrain predicted at start-up, and the tensor files compared byte for byte with the
synchronous run's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

from llmtrain.model import build_model
from llmtrain.run.rundir import RunDir
from llmtrain.run.trained import model_config_from

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BIG = ["model.block_size=256", "dist.activation_checkpointing=true", "train.micro_batch_size=1",
       "train.global_batch_size=2"]
SIZES = {  # a size: its overrides, steps, and a checkpoint every N steps
    "small": (["model=small", "model.block_size=128", "dist.zero_stage=2", "train.micro_batch_size=8",
               "train.global_batch_size=16"], 12, 2),
    "350m": (["model=350m", "dist.zero_stage=3", *BIG], 4, 1),
    "760m": (["model=760m", "dist.zero_stage=3", *BIG], 4, 1),
}
MODES = {"sync": ["train.checkpoint_async=false"],
         "whole": ["train.checkpoint_async=true", "train.checkpoint_buffer_gb=null"],
         "bounded": ["train.checkpoint_async=true"]}
FORMULA = {2: lambda psi, n: 4 * psi + 12 * psi / n, 3: lambda psi, n: 16 * psi / n}  # fp32 Adam, the ZeRO paper
SAVED = re.compile(r"checkpoint of step (\d+): ([\d.]+) GB in ([\d.]+) s(?:; the loop stopped ([\d.]+) s of it)?")
WAITED = re.compile(r"waited ([\d.]+) s for the checkpoint being written before the (save|update) of step (\d+)")
PREDICTED = re.compile(r"memory per rank, predicted: ([\d.]+) GB = .* process ([\d.]+)")
# Measures the peak resident memory of a command's processes (ranks included): the largest of them.
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); sys.exit(code)")


def train(data: str, run_dir: Path, overrides: list[str], steps: int, every: int) -> dict:
    args = [f"data.dir={data}", f"run.dir={run_dir}", "precision=fp32", *overrides, f"train.max_steps={steps}",
            f"train.checkpoint_every={every}", "train.keep_checkpoints=2", "train.log_every=1", "train.eval_every=0",
            "train.eval_windows=4", "optim.warmup_steps=1", "run.resume=restart"]
    cmd = [sys.executable, "-c", PEAK, str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
           "llmtrain.cli.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    waits: dict[int, float] = {}
    for seconds, before, step in WAITED.findall(proc.stderr):  # a wait before step s + 1's update is save s's
        saved_at = int(step) - (before == "update")
        waits[saved_at] = waits.get(saved_at, 0.0) + float(seconds)
    saves = [{"step": int(step), "gb": float(gb), "complete_s": float(total), "background": bool(stopped),
              "stopped_s": float(stopped or total) + waits.get(int(step), 0.0)}
             for step, gb, total, stopped in SAVED.findall(proc.stderr)]
    rows = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    predicted, baseline = (float(x) * 2**30 for x in PREDICTED.search(proc.stderr).groups())
    model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    with torch.device("meta"):
        psi = build_model(model_config_from(model)).num_params(non_embedding=False)
    return {"saves": saves, "loop_s": sum(r["step_time_s"] for r in rows if "step_time_s" in r), "psi": psi,
            "peak": int(proc.stderr.strip().splitlines()[-1]), "predicted": predicted, "baseline": baseline,
            "direct": "saving synchronously" in proc.stderr}


def same_files(a: Path, b: Path) -> str:
    """Whether the two newest checkpoints of two runs (a background save and the last one) hold the same tensor
    files, byte for byte."""
    ca, cb = (RunDir(run).checkpoints for run in (a, b))
    names = sorted(p.relative_to(ca).as_posix() for p in ca.glob("*/*.pt"))
    same = all((cb / n).is_file() and (ca / n).read_bytes() == (cb / n).read_bytes() for n in names)
    return f"{len(names)} {'identical' if same else 'DIFFER'}"


def memory_cells(run: dict, stage: int) -> list[str]:
    gib, formula = 2**30, FORMULA[stage](run["psi"], 2)
    return [f"{run['peak'] / gib:.2f}", f"{(run['peak'] - run['baseline']) / formula:.2f}",
            f"{run['predicted'] / gib:.2f}", f"{run['predicted'] / run['peak']:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data.dir (llmtrain-prepare data=stdlib ...)")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES),
                        help="sync, when given, runs first")
    parser.add_argument("--final", nargs="*", default=[], choices=list(SIZES),
                        help="sizes also run with default settings and only a final save, at ZeRO-2 and ZeRO-3")
    args = parser.parse_args()
    stops, memory = [], []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        for size in args.sizes:
            overrides, steps, every = SIZES[size]
            stage = 3 if "dist.zero_stage=3" in overrides else 2
            runs, files = {}, {}
            for mode in sorted(args.modes, key=lambda m: m != "sync"):  # sync first: the others are compared with it
                run_dir = Path(tmp) / f"{size}-{mode}"
                runs[mode] = train(args.data, run_dir, [*overrides, *MODES[mode]], steps, every)
                sync_dir = Path(tmp) / f"{size}-sync"
                files[mode] = same_files(sync_dir, run_dir) if "sync" in runs else "-"
                if mode != "sync":
                    shutil.rmtree(run_dir)
            shutil.rmtree(Path(tmp) / f"{size}-sync", ignore_errors=True)
            sync = runs.get("sync")
            for mode, r in runs.items():
                counted = [s for s in r["saves"] if s["background"] or mode == "sync"]
                stopped = statistics.median(s["stopped_s"] for s in counted)
                base = statistics.median(s["stopped_s"] for s in sync["saves"]) if sync else float("nan")
                complete = statistics.median(s["complete_s"] for s in counted)
                stops.append([size, mode, f"{statistics.median(s['gb'] for s in r['saves']):.2f}", len(counted),
                              f"{stopped:.2f}", f"{stopped / base:.1%}", f"{complete:.2f}", f"{r['loop_s']:.1f}",
                              files[mode]])
                memory.append([size, f"ZeRO-{stage}", mode, f"{r['psi'] / 1e6:.0f}M", *memory_cells(r, stage)])
        for size in args.final:
            overrides, _, _ = SIZES[size]
            for stage in (2, 3):
                changed = [o for o in overrides if not o.startswith("dist.zero_stage")] + [f"dist.zero_stage={stage}"]
                r = train(args.data, Path(tmp) / f"{size}-final-{stage}", changed, 2, 0)
                how = "defaults, final save only" + (" (auto: synchronous)" if r["direct"] else "")
                memory.append([size, f"ZeRO-{stage}", how, f"{r['psi'] / 1e6:.0f}M", *memory_cells(r, stage)])
                shutil.rmtree(Path(tmp) / f"{size}-final-{stage}")
    table("Checkpoint saves on 2 ranks, fp32: the loop's stop per save (median; the last, direct save left out of the "
          "background modes)", ["size", "mode", "GB", "saves", "loop stopped s", "/ sync", "complete after s",
                                "loop s, all steps", "tensor files vs sync"], stops)
    table("Peak resident memory of the larger rank (GiB) against the ZeRO formula for fp32 Adam and the prediction",
          ["size", "stage", "mode", "Ψ", "peak", "(peak - baseline) / formula", "predicted", "predicted / peak"],
          memory)


if __name__ == "__main__":
    main()
