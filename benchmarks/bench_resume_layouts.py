"""A checkpoint resumed in another layout: exact, or refused. One table, measured in one run.

    .venv/bin/python benchmarks/bench_resume_layouts.py --data data/stdlib     # ~10 minutes on 2 cores

For each pair: the source layout trains `tiny` (fp32, global batch 8, 30 steps, a checkpoint at step 10) without
a stop; a copy of its run folder cut back to that checkpoint is resumed in the target layout to step 30. The
largest relative gap over steps 11-30, in the loss and the gradient norm, against the source's uninterrupted run
(the 1e-5 promise), or the one line the resume was refused with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
STEPS, SAVED = 30, 10
COMMON = ["model=tiny", f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=10", "train.keep_checkpoints=5",
          "optim.warmup_steps=5", "optim.lr=3e-3", "precision=fp32"]
MOE = ["model.norm=rmsnorm", "model.pos=rope", "model.mlp=swiglu", "model.n_experts=4"]

# (name, source ranks, source overrides, target ranks, target overrides)
PAIRS = [
    ("ZeRO-0, 2 ranks -> 1", 2, ["dist.zero_stage=0"], 1, ["dist.zero_stage=0"]),
    ("ZeRO-1, 2 ranks -> 1", 2, ["dist.zero_stage=1"], 1, ["dist.zero_stage=1"]),
    ("ZeRO-2, 2 ranks -> 1", 2, ["dist.zero_stage=2"], 1, ["dist.zero_stage=2"]),
    ("ZeRO-3, 2 ranks -> 1", 2, ["dist.zero_stage=3"], 1, ["dist.zero_stage=3"]),
    ("ZeRO-3, 1 rank -> 2", 1, ["dist.zero_stage=3"], 2, ["dist.zero_stage=3"]),
    ("ZeRO-1 -> ZeRO-2, 2 ranks", 2, ["dist.zero_stage=1"], 2, ["dist.zero_stage=2"]),
    ("ZeRO-2 -> ZeRO-3, 2 ranks", 2, ["dist.zero_stage=2"], 2, ["dist.zero_stage=3"]),
    ("ZeRO-3 -> ZeRO-1, 2 ranks", 2, ["dist.zero_stage=3"], 2, ["dist.zero_stage=1"]),
    ("ZeRO-0 -> ZeRO-1, 2 ranks", 2, ["dist.zero_stage=0"], 2, ["dist.zero_stage=1"]),
    ("TP 2 (ZeRO-1) -> 1 rank", 2, ["dist.zero_stage=1", "dist.tensor_parallel=2"], 1, ["dist.zero_stage=1"]),
    ("TP 2 (ZeRO-0) -> 1 rank", 2, ["dist.zero_stage=0", "dist.tensor_parallel=2"], 1, ["dist.zero_stage=0"]),
    ("SP 2 (ZeRO-3) -> 1 rank", 2, ["dist.zero_stage=3", "dist.sequence_parallel=2"], 1, ["dist.zero_stage=3"]),
    ("PP 2 (ZeRO-1) -> 1 rank", 2, ["dist.zero_stage=1", "dist.pipeline_parallel=2"], 1, ["dist.zero_stage=1"]),
    ("EP 2 (ZeRO-0) -> 1 rank", 2, [*MOE, "dist.zero_stage=0", "dist.expert_parallel=2"], 1,
     [*MOE, "dist.zero_stage=0"]),
]


def train(data: str, run_dir: Path, ranks: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = ([str(BIN / "llmtrain-train")] if ranks == 1 else
           [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "llmtrain.cli.train"])
    return subprocess.run([*cmd, f"data.dir={data}", f"run.dir={run_dir}", *COMMON, *overrides],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def metrics(run_dir: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def gap(ours: dict[int, dict], theirs: dict[int, dict], key: str) -> float:
    return max(abs(ours[s][key] - theirs[s][key]) / abs(theirs[s][key]) for s in range(SAVED + 1, STEPS + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared data.dir")
    parser.add_argument("--only", default="", help="run the pairs whose name contains this")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, source, target_ranks, target in PAIRS:
            if args.only not in name:
                continue
            src = Path(tmp) / f"src{len(rows)}"
            proc = train(args.data, src, ranks, *source)
            if proc.returncode:
                raise SystemExit(f"{name}: the source run failed:\n{proc.stderr[-3000:]}")
            dst = Path(tmp) / f"dst{len(rows)}"
            shutil.copytree(src, dst)
            for folder in (dst / "checkpoints").glob("step_*"):
                if folder.name != f"step_{SAVED:08d}":
                    shutil.rmtree(folder)
            with open(dst / "metrics.jsonl") as f:  # the copy's history as it was at the checkpoint
                kept = [line for line in f if json.loads(line)["step"] <= SAVED]
            (dst / "metrics.jsonl").write_text("".join(kept))
            proc = train(args.data, dst, target_ranks, *target)
            if proc.returncode:
                refusal = next((line for line in proc.stderr.splitlines() if "error:" in line), proc.stderr[-200:])
                rows.append([name, "refused", "-", refusal.split("error: ", 1)[-1][:150]])
            else:
                ours, theirs = metrics(dst), metrics(src)
                rows.append([name, f"{gap(ours, theirs, 'loss'):.1e}", f"{gap(ours, theirs, 'grad_norm'):.1e}", ""])
            print(" | ".join(rows[-1]), flush=True)
    table("A checkpoint resumed in another layout (tiny, fp32, steps 11-30 against the source's run)",
          ["source -> target", "loss gap", "grad norm gap", "refusal"], rows)


if __name__ == "__main__":
    main()
