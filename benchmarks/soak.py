"""Soak: a long `tiny` job SIGKILLed at random times, some inside background saves, re-run after each kill; at the
end its losses against an uninterrupted run of the same layout, step by step. A benchmark, not a CI test.

    .venv/bin/python benchmarks/soak.py --data data/stdlib                  # 100 kills over 4 layouts, ~30 minutes
    .venv/bin/python benchmarks/soak.py --data data/stdlib --kills 8 --only tp2

Each layout runs on 2 ranks under torchrun, fp32, a background checkpoint every 3 steps (keep 2). A kill ends the
whole job at once (the launcher and its ranks, SIGKILL to the process group, as a lost node does): every third kill
waits for a save under way (a checkpoint folder without its COMPLETE.json) and lands inside it; the others land a
random 0-2 s after the job logged its first step. The job is then started again with the same command (it resumes
from the newest complete checkpoint), until it reaches the last step. Printed: kills, kills inside a save, launches,
and the steps whose logged loss differs from the uninterrupted run's (bitwise: an in-layout resume is exact).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
STEPS = 600
COMMON = ["model=tiny", f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.log_every=1", "train.eval_every=100", "train.eval_windows=40", "train.checkpoint_every=3",
          "train.keep_checkpoints=2", "train.checkpoint_async=true", "optim.warmup_steps=5", "optim.lr=3e-3",
          "precision=fp32"]
LAYOUTS = {
    "zero3": ["dist.zero_stage=3"],
    "tp2": ["dist.zero_stage=1", "dist.tensor_parallel=2"],
    "sp2": ["dist.zero_stage=3", "dist.sequence_parallel=2"],
    "pp2": ["dist.zero_stage=1", "dist.pipeline_parallel=2"],
}


def command(data: str, run_dir: Path, layout: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "llmtrain.cli.train",
            f"data.dir={data}", f"run.dir={run_dir}", *COMMON, *layout]


def logged(run_dir: Path) -> dict[int, float]:
    """Each step's last logged loss (a step logged again after a resume keeps its last value)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by the kill: the next start drops it
            pass
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def saving(run_dir: Path) -> bool:
    folders = (run_dir / "checkpoints").glob("step_*[0-9]")
    return any(f.is_dir() and not (f / "COMPLETE.json").exists() for f in folders)


def soak(data: str, run_dir: Path, layout: list[str], kills: int, rng: random.Random) -> dict:
    done = {"kills": 0, "in_save": 0, "launches": 0}
    log = run_dir.parent / f"{run_dir.name}.log"
    while True:
        done["launches"] += 1
        start = max(logged(run_dir) or [0])
        with open(log, "a") as out:
            job = subprocess.Popen(command(data, run_dir, layout), cwd=REPO, stdout=out, stderr=out,
                                   start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done["kills"] >= kills:
            if job.wait() != 0:
                raise SystemExit(f"the last launch failed: see {log}")
            return done
        # wait for training to go on (a step past where it resumed), then pick the moment
        while job.poll() is None and max(logged(run_dir) or [0]) <= start:
            time.sleep(0.05)
        in_save = done["kills"] % 3 == 2
        deadline = time.time() + (30 if in_save else rng.uniform(0, 2))
        while job.poll() is None and time.time() < deadline and not (in_save and saving(run_dir)):
            time.sleep(0.002 if in_save else 0.02)
        if job.poll() is not None:  # it finished before the kill: the run is complete
            if job.returncode != 0:
                raise SystemExit(f"a launch failed: see {log}")
            return done
        caught = in_save and saving(run_dir)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        done["kills"] += 1
        done["in_save"] += caught


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared data.dir")
    parser.add_argument("--kills", type=int, default=25, help="kills per layout")
    parser.add_argument("--only", default="", help="run only this layout (zero3, tp2, sp2, pp2)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items():
            if args.only and name != args.only:
                continue
            reference = Path(tmp) / f"{name}-reference"
            proc = subprocess.run(command(args.data, reference, layout), cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                raise SystemExit(f"{name}: the uninterrupted run failed:\n{proc.stderr[-3000:]}")
            began = time.time()
            done = soak(args.data, Path(tmp) / name, layout, args.kills, rng)
            got, want = logged(Path(tmp) / name), logged(reference)
            differing = [s for s in want if got.get(s) != want[s]]
            rows.append([name, " ".join(layout), done["kills"], done["in_save"], done["launches"],
                         f"{len(got)}/{len(want)}", len(differing), f"{time.time() - began:.0f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
            if differing:
                print(f"  differing steps: {differing[:20]}", flush=True)
            shutil.rmtree(Path(tmp) / name, ignore_errors=True)
    table(f"Soak: {STEPS} steps of tiny on 2 ranks, SIGKILL and re-run (seed {args.seed})",
          ["layout", "settings", "kills", "inside a save", "launches", "steps logged", "differing losses", "s"], rows)
    print(f"\nkills in all: {sum(r[2] for r in rows)}; differing losses in all: {sum(r[6] for r in rows)}")


if __name__ == "__main__":
    main()
