"""Asynchronous parameter servers against synchronous ZeRO, measured side by side in one run.

    .venv/bin/python benchmarks/bench_async.py --data data/stdlib            # ~15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_async.py --data data/stdlib --precisions fp32 bf16 --model mini --skip loss

1. updates/s and tokens/s with 1 and 2 workers (+1 server), beside sync ZeRO-2 on 1 and 2 ranks at the same
   global batch and precision; bytes moved per update against the minimum (a pull and a push of every
   parameter in the run's precision: 4 bytes each in fp32, 2 in bf16).
2. validation loss at equal tokens: sync, async, and async with the staleness-aware learning rate
   (llmtrain-compare's runs, the demo's model and batch, fp32).
3. Downpour's intervals, overlap and transports (`--skip intervals` leaves it out; ~50 minutes): 2 workers (+1
   server) in `--interval-precision` (bf16: pulls and pushes move bf16), push and fetch every K = 1, 2, 4 local
   steps (`--interval-k`; `ps.push_every=K ps.fetch_every=K`), without and with `ps.overlap=true`, over
   TensorPipe's TCP transport (`ps.transport=tcp`) and gRPC (`grpc`, the transport workers can join), and, at K = 1
   without overlap, TensorPipe's own pick (`auto`: shared memory between processes of one host); `--transports`
   picks among them. Against sync ZeRO-2 on 2 ranks at the same global batch and precision: tokens/s, its ratio to
   sync, mean staleness, the time a worker waits on its pull and push per update, the bytes moved per update, and the
   validation loss after the same tokens.
4. Stragglers (`--skip stragglers` leaves it out; ~10 minutes): `llmtrain-compare compare.slow_rank_factor=F`
   (`--slow-factor`, 2 by default) on `--model`, fp32, 2 compute ranks: sync and async without and with one compute
   rank F times slower per micro-batch. Per run: tokens/s, the validation loss after the same tokens (the last
   evaluation), and at equal time (the last evaluation each run had made when the quickest of the four ended;
   time counts from each run's first logged step).
   `--straggler-dir` keeps the comparison's folder (plots, table, runs).
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
    given = {o.split("=", 1)[0] for o in overrides}
    defaults = [d for d in ("train.log_every=5", "train.eval_every=0", "train.eval_windows=100",
                            "train.checkpoint_every=0") if d.split("=", 1)[0] not in given]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
           "llmtrain.cli.train", f"data.dir={data}", f"run.dir={run_dir}", *BATCH, f"train.max_steps={steps}",
           *defaults, *overrides]
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


def intervals(data: str, work: Path, steps: int, model: str, precision: str, transports: list[str],
              ks: list[int]) -> None:
    common = [f"model={model}", f"precision={precision}", f"train.eval_every={steps}"]

    def measured(rows: list[dict]) -> dict[str, float]:
        logged = [r for r in rows if "tokens_per_s" in r][1:]  # the first interval holds the start-up
        mean = lambda key: float(np.mean([r[key] for r in logged])) if key in logged[-1] else 0.0  # noqa: E731
        return {"tps": mean("tokens_per_s"), "stale": mean("staleness_mean"), "val": rows[-1]["val_loss"],
                "pull": mean("pull_s") * 1e3, "push": mean("push_s") * 1e3, "bytes": mean("bytes_per_update")}

    sync = measured(train(data, work / "i-sync", 2, steps, *common, "dist.zero_stage=2"))
    out = [["sync ZeRO-2", "", "", "", f"{sync['tps']:,.0f}", "1.00", "0", "", "", "", f"{sync['val']:.4f}"]]
    runs = [("auto", 1, False)] * ("auto" in transports and 1 in ks)
    runs += [(t, k, o) for t in ("tcp", "grpc") if t in transports for k in ks for o in (False, True)]
    for transport, k, overlap in runs:
        name = f"i-ps-{transport}-k{k}-{'overlap' if overlap else 'blocking'}"
        got = measured(train(data, work / name, 3, steps, *common, "mode=async_ps", f"ps.transport={transport}",
                             f"ps.push_every={k}", f"ps.fetch_every={k}", f"ps.overlap={str(overlap).lower()}"))
        out.append(["async, 2 workers", transport, k, "yes" if overlap else "no", f"{got['tps']:,.0f}",
                    f"{got['tps'] / sync['tps']:.2f}", f"{got['stale']:.2f}", f"{got['pull']:.0f}",
                    f"{got['push']:.0f}", f"{got['bytes'] / 2**20:.1f}", f"{got['val']:.4f}"])
    table(f"3. {model} {precision} (block 128, global batch 16), {steps} steps: push and fetch every K local steps, "
          "with and without overlap, over TensorPipe's TCP transport (ps.transport=tcp), gRPC (grpc) and TensorPipe's "
          "own pick (auto: shared memory on one host), against sync ZeRO-2 on the same 2 compute ranks; pull and push: "
          "ms a worker waits per update; MiB moved per update; val loss after the same tokens",
          ["mode", "transport", "K", "overlap", "tokens/s", "x sync", "mean staleness", "pull ms", "push ms",
           "MiB/update", "val loss"], out)


def stragglers(data: str, work: Path, steps: int, model: str, factor: float, out: Path | None) -> None:
    out = out or work / "stragglers"
    cmd = [sys.executable, "-m", "llmtrain.cli.compare", f"data.dir={data}", f"compare.dir={out}",
           "compare.staleness_lr=false", f"compare.slow_rank_factor={factor}", f"model={model}", "precision=fp32",
           *BATCH, f"train.max_steps={steps}", "train.log_every=5", f"train.eval_every={max(1, steps // 6)}",
           "train.eval_windows=100", "train.checkpoint_every=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"llmtrain-compare failed:\n{proc.stderr[-3000:]}")
    runs = {}
    for name, folder in (("sync", "sync"), ("async", "async"), ("sync", f"slow-{factor:g}/sync"),
                         ("async", f"slow-{factor:g}/async")):
        rows = [json.loads(line) for line in RunDir(out / folder).metrics.read_text().splitlines()]
        logged = [r for r in rows if "tokens_per_s" in r]
        start = logged[0]["time"]  # time counts from the first logged step: start-ups differ between the modes
        evals = [(r["time"] - start, r["val_loss"]) for r in rows if "val_loss" in r]
        logged = logged[1:]
        runs[folder] = (name, 1.0 if folder in ("sync", "async") else factor,
                        float(np.mean([r["tokens_per_s"] for r in logged])), evals)
    quickest = min(evals[-1][0] for _, _, _, evals in runs.values())
    out_rows = []
    for name, slow, tps, evals in runs.values():
        at_time = [loss for t, loss in evals if t <= quickest + 1e-6]
        out_rows.append([name, f"x{slow:g}", f"{tps:,.0f}", f"{evals[-1][1]:.4f}", f"{evals[-1][0]:.0f}",
                         f"{at_time[-1]:.4f}" if at_time else "-"])
    table(f"4. stragglers: {model} fp32 (block 128, global batch 16), {steps} steps, 2 compute ranks, one of them "
          f"x{factor:g} slower per micro-batch or not; equal time = {quickest:.0f} s of training (the quickest run)",
          ["mode", "slow rank", "tokens/s", "val loss (equal tokens)", "s to the end", "val loss (equal time)"],
          out_rows)
    print((out / "table.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data.dir (llmtrain-prepare data=stdlib ...)")
    parser.add_argument("--steps", type=int, default=30, help="steps of the throughput runs")
    parser.add_argument("--loss-steps", type=int, default=100, help="steps of the equal-token loss runs")
    parser.add_argument("--model", default="small", help="the model preset of the throughput runs")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=sorted(BYTES),
                        help="precisions of the throughput runs (bf16 is slow on CPUs without native bf16)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "loss", "intervals", "stragglers"])
    parser.add_argument("--slow-factor", type=float, default=2.0, help="table 4's straggler factor")
    parser.add_argument("--straggler-steps", type=int, default=60, help="steps of table 4's runs")
    parser.add_argument("--straggler-dir", type=Path, default=None, help="keep table 4's comparison folder here")
    parser.add_argument("--interval-steps", type=int, default=60, help="steps of table 3's runs")
    parser.add_argument("--interval-precision", default="bf16", choices=sorted(BYTES), help="table 3's precision")
    parser.add_argument("--transports", nargs="+", default=["auto", "tcp", "grpc"], choices=["auto", "tcp", "grpc"],
                        help="table 3's transports")
    parser.add_argument("--interval-k", nargs="+", type=int, default=[1, 2, 4], help="table 3's intervals K")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:  # run folders, each with its last checkpoint
        work = Path(tmp)
        if "throughput" not in args.skip:
            throughput(args.data, work, args.steps, args.model, args.precisions)
        if "loss" not in args.skip:
            loss_at_equal_tokens(args.data, work, args.loss_steps)
        if "intervals" not in args.skip:
            intervals(args.data, work, args.interval_steps, args.model, args.interval_precision, args.transports,
                      args.interval_k)
        if "stragglers" not in args.skip:
            stragglers(args.data, work, args.straggler_steps, args.model, args.slow_factor, args.straggler_dir)


if __name__ == "__main__":
    main()
