"""Mixture of experts, measured side by side in one run (CPU here; the same script runs on GPUs).

    .venv/bin/python benchmarks/bench_moe.py --data data/stdlib      # ~40 minutes on 2 cores

0. Exactly the 1-process model: the Llama-style `tiny` as 4 experts, 2 per token, dropless, fp32, 20 steps (global
   batch 8), each layout against one process on the same micro-batches: the largest relative gap in losses, router
   aux and z losses, gradient norms and validation losses; and a stop at step 10 and resume in the layout (bitwise
   or not).
1. Sparse against dense at equal tokens: the Llama-style `small` (6 blocks of 384, SwiGLU 1024 wide), and as 8
   experts with k = 2 of half its width (the same active parameters per token) and of an eighth (the same total
   parameters), bf16, block 128, global batch 16, the same steps: validation loss, tokens/s, active GFLOP/s
   (tokens/s x the active training FLOPs per token: MFU's numerator, beside a peak each run probes anew), peak
   resident memory against llmtrain's start-up prediction.
2. Expert parallel 2 against 1 on 2 ranks (ZeRO-1, the same-active model): plumbing only on CPU ranks -- both ranks
   share two cores, and the all-to-all exchanges move no faster here.
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

LLAMA = ["model.norm=rmsnorm", "model.pos=rope", "model.mlp=swiglu"]
TINY_MOE = ["model=tiny", *LLAMA, "model.n_experts=4", "model.experts_per_token=2", "train.router_z_coef=0.001",
            "train.max_steps=20", "train.global_batch_size=8", "train.log_every=1", "train.eval_every=10",
            "train.eval_windows=40", "train.checkpoint_every=10", "optim.warmup_steps=5", "optim.lr=3e-3",
            "precision=fp32"]


def train(data: str, run_dir: Path, ranks: int, *overrides: str) -> tuple[dict[int, dict], str]:
    """Train (resuming where run_dir has a checkpoint); the metrics by step and the log."""
    cmd = ([str(BIN / "llmtrain-train")] if ranks == 1 else
           [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "llmtrain.cli.train"])
    proc = subprocess.run([*cmd, f"data.dir={data}", f"run.dir={run_dir}", *overrides], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks))})
    if proc.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows, proc.stderr


def gap(ours: dict[int, dict], theirs: dict[int, dict], key: str) -> str:
    pairs = [(ours[s][key], theirs[s][key]) for s in theirs if key in theirs[s] and key in ours.get(s, {})]
    return f"{max(abs(a - b) / abs(b) for a, b in pairs):.1e}" if pairs else "-"


def equivalence(data: str, work: Path) -> None:
    one = {micro: train(data, work / f"one-{micro}", 1, *TINY_MOE, f"train.micro_batch_size={micro}")[0]
           for micro in (4, 2)}
    layouts = [("DP=2 (experts whole), ZeRO-0", 2, ["dist.zero_stage=0"], 4),
               ("EP=2, ZeRO-0 (llmtrain's norm)", 2, ["dist.expert_parallel=2", "dist.zero_stage=0"], 4),
               ("EP=2, ZeRO-1", 2, ["dist.expert_parallel=2", "dist.zero_stage=1"], 4),
               ("EP=2 x 2 expert groups, ZeRO-2", 4, ["dist.expert_parallel=2", "dist.zero_stage=2"], 2),
               ("DP=2 (experts whole), ZeRO-3", 2, ["dist.zero_stage=3"], 4)]
    rows = []
    for name, ranks, overrides, micro in layouts:
        folder = work / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        ours = train(data, folder, ranks, *TINY_MOE, *overrides, f"train.micro_batch_size={micro}")[0]
        resumed = "-"
        if "expert_parallel=2" in overrides[0] and ranks == 2:
            again = folder.with_name(folder.name + "-resumed")
            train(data, again, ranks, *TINY_MOE, *overrides, f"train.micro_batch_size={micro}",
                  "train.stop_at_step=10")
            rerun = train(data, again, ranks, *TINY_MOE, *overrides, f"train.micro_batch_size={micro}")[0]
            resumed = "bitwise" if all(rerun[s]["loss"] == ours[s]["loss"] for s in ours if "loss" in ours[s]) \
                else "differs"
        rows.append([name, ranks, *(gap(ours, one[micro], key) for key in
                                    ("loss", "moe/aux_loss", "moe/z_loss", "grad_norm", "val_loss")), resumed])
    table("0. against one process, tiny as 4 experts (k = 2) fp32, 20 steps: largest relative gap",
          ["layout", "ranks", "loss", "aux loss", "z loss", "grad norm", "val loss", "stop + resume"], rows)


def summary(rows: dict[int, dict], log: str) -> list[str]:
    steps = sorted(s for s in rows if "loss" in rows[s])
    later = [rows[s] for s in steps[len(steps) // 4:]]  # past the first quarter's warm-up
    tokens_per_s = sum(r["tokens_per_s"] for r in later) / len(later)
    flops = re.search(r"([0-9.e+]+) FLOPs/token", log)
    val = [rows[s]["val_loss"] for s in sorted(rows) if "val_loss" in rows[s]][-1]
    predicted = re.search(r"memory per rank: predicted ([0-9.]+) GB", log)
    params = re.search(r"([0-9.]+)M parameters \(non-embedding, ([0-9.]+)M active per token\)", log)
    achieved = tokens_per_s * float(flops.group(1)) / 1e9 if flops else float("nan")
    return [f"{params.group(1)}M", f"{params.group(2)}M", f"{val:.3f}", f"{tokens_per_s:,.0f}", f"{achieved:.0f}",
            f"{later[-1]['peak_mem_gb']:.2f}", predicted.group(1) if predicted else "-"]


def quality(data: str, work: Path, steps: int) -> None:
    common = ["model=small", *LLAMA, f"train.max_steps={steps}", "model.block_size=128", "train.global_batch_size=16",
              "train.micro_batch_size=8", f"train.log_every={max(1, steps // 20)}", f"train.eval_every={steps}",
              "train.eval_windows=100", "train.checkpoint_every=0", "optim.lr=1e-3", "optim.warmup_steps=10"]
    models = [("dense (SwiGLU 1024)", []),
              ("8 experts x 512, k = 2 (same active)", ["model.n_experts=8", "model.experts_per_token=2",
                                                        "model.moe_hidden=512"]),
              ("8 experts x 128, k = 2 (same total)", ["model.n_experts=8", "model.experts_per_token=2",
                                                       "model.moe_hidden=128"])]
    rows = [[name, *summary(*train(data, work / f"q{i}", 1, *common, *extra))] for i, (name, extra) in
            enumerate(models)]
    table(f"1. small, bf16, {steps} steps of 16 x 128 tokens, 1 process: sparse against dense",
          ["model", "params", "active", "val loss", "tokens/s", "active GFLOP/s", "peak GB", "predicted GB"], rows)


def expert_parallel(data: str, work: Path, steps: int) -> None:
    common = ["model=small", *LLAMA, "model.n_experts=8", "model.experts_per_token=2", "model.moe_hidden=512",
              f"train.max_steps={steps}", "model.block_size=128", "train.global_batch_size=16",
              "train.micro_batch_size=8", "train.log_every=1", f"train.eval_every={steps}", "train.eval_windows=40",
              "train.checkpoint_every=0", "dist.zero_stage=1"]
    rows = [[f"EP={ep}", *summary(*train(data, work / f"ep{ep}", 2, *common, f"dist.expert_parallel={ep}"))]
            for ep in (1, 2)]
    table(f"2. expert parallel on 2 ranks, ZeRO-1, {steps} steps (rank 0's memory; CPU ranks: plumbing only)",
          ["layout", "params", "active", "val loss", "tokens/s", "active GFLOP/s", "peak GB", "predicted GB"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared data folder (llmtrain-prepare)")
    parser.add_argument("--steps", type=int, default=200, help="table 1's steps")
    parser.add_argument("--ep-steps", type=int, default=12, help="table 2's steps")
    parser.add_argument("--skip", nargs="*", default=[], choices=["equivalence", "quality", "expert_parallel"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    try:
        if "equivalence" not in args.skip:
            equivalence(args.data, work)
        if "quality" not in args.skip:
            quality(args.data, work, args.steps)
        if "expert_parallel" not in args.skip:
            expert_parallel(args.data, work, args.ep_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
