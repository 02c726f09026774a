"""Training throughput, MFU and ZeRO memory, side by side in one run (CPU here; the same script runs on GPUs).

    .venv/bin/pip install transformers        # the reference loop only; not a dependency of llmtrain
    .venv/bin/python benchmarks/bench_train.py --data data/stdlib   # ~10 minutes on 2 cores, table 4 ~10 more

0. What the framework costs: `llmtrain-train` against a bare loop over the same GPT module (torch.optim.AdamW,
   accumulation, clipping; benchmarks/_bare_loop.py), `small` at block 128, micro-batch 8 x 2 accumulation, fp32,
   runs interleaved A/B/A/B: 1 process x 2 threads for both, and ZeRO-2 on 2 ranks x 1 thread against the bare
   loop at 2 threads (same global batch); then train.compile=true against false, fp32 and bf16, 1 process.
   0c: against the simplest peer (benchmarks/_peer_gpt.py: a GPT-2 block stack written for the benchmark, torch
   AdamW at its defaults, torch DDP on 2 ranks), the same shape: 1 process with GPT-2's tanh GELU and with exact
   GELU (model.mlp=gelu_exact) on both sides, and ZeRO-2 against DDP on 2 ranks; whole runs interleaved A/B/A/B.
   0d: the same setups with the two training steps alternated step by step in one process per rank
   (benchmarks/_alternate.py), which machine-speed drift between runs cannot tilt.
1. `small` in one process, fp32 and bf16: llmtrain (DeepSpeed engine, ZeRO-0) against a plain PyTorch loop
   over Hugging Face `transformers`' GPT2LMHeadModel of the same shape with torch.optim.AdamW: tokens/s,
   MFU against the matmul peak measured in this run, and the ratio ours/theirs.
2. ZeRO 0/1/2/3 on 2 ranks (1 thread each) against 1 process with 2 threads, same global batch: tokens/s.
3. Memory per rank as the operating system counts it (peak resident set size; max_memory_allocated on GPUs) per
   ZeRO stage on 2 ranks, `350m` fp32: beside the ZeRO formula for fp32 Adam (16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N),
   the bytes of the state tensors, the process baseline (PyTorch + DeepSpeed loaded, no model) and the prediction
   llmtrain logs at start-up.
4. Long context (`--skip long` leaves it out; ~10 minutes on 2 cores, ~45 with `--long-lengths 4096 16384
   --long-budget-gb 2.2`): `small` with RoPE, fp32, ZeRO-1 (`--long-zero-stage`; from ZeRO-1 on glibc is tuned to hand
   freed blocks of 4 MiB or more back, see llmtrain/allocator.py), activation checkpointing, micro-batch 1, 2 steps, at
   each of `--long-lengths`: 1 rank x 2 threads against 2 ranks x 1 thread with `dist.sequence_parallel=2`, each run
   under benchmarks/_step_memory.py. Per rank (rank 0's log and steps): the predicted and the measured peak resident
   memory, and the activation part: step 2's peak above what the rank held as step 2 began. Then the longest length on
   ranks of `--long-budget-gb` each: where this process may create a memory cgroup (root; cgroup v1 or v2), the
   2-rank run trains inside a cgroup of twice the budget and the 1-rank run is started inside one of the budget, where
   the kernel ends it when it outgrows the budget instead of taking memory from the rest of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

from llmtrain.distributed.memory import memory_cgroups
from llmtrain.run.metrics import probe_peak
from llmtrain.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
# Model-state bytes per parameter per rank, fp32 weights + gradients + Adam moments (4 + 4 + 8), by ZeRO stage.
FP32_FORMULA = {0: lambda n: 16, 1: lambda n: 8 + 8 / n, 2: lambda n: 4 + 12 / n, 3: lambda n: 16 / n}


def ours(data: str, work: Path, name: str, ranks: int, threads: int, precision: str, stage: int, steps: int,
         micro: int, global_batch: int, *extra: str, bias: bool = True) -> dict:
    """tokens/s and MFU from llmtrain's own metrics.jsonl, first logged interval (warm-up) left out. ``bias``:
    GPT-2's linear biases, as the `transformers` reference has them (the bare loop runs the preset, without)."""
    run_dir = work / name
    args = [f"data.dir={data}", f"run.dir={run_dir}", "model=small", f"model.bias={str(bias).lower()}",
            f"precision={precision}",
            f"dist.zero_stage={stage}", f"train.max_steps={steps}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={global_batch}", f"train.log_every={max(1, steps // 4)}", "train.eval_every=0",
            "train.eval_windows=8", "train.checkpoint_every=0", "run.resume=restart", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        cmd = [str(BIN / "llmtrain-train"), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "llmtrain.cli.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][1:]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
            "mfu": sum(r["mfu"] for r in rows) / len(rows)}


def launcher(ranks: int) -> list[str]:
    """How a benchmark script starts: this Python for one process, torchrun for more."""
    return [sys.executable] if ranks == 1 else [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]


def pair_cells(mine: list[float], theirs: list[float]) -> list[str]:
    """Interleaved pairs as table cells: each side's runs, the ratio per pair, the median pair, the ratio of sums."""
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    return [" / ".join(f"{t:,.0f}" for t in mine), " / ".join(f"{t:,.0f}" for t in theirs),
            " / ".join(f"{r:.3f}" for r in ratios), f"{statistics.median(ratios):.3f}",
            f"{sum(mine) / sum(theirs):.3f}"]


def bare(data: str, threads: int, steps: int, micro: int, accum: int, block: int, ranks: int = 1, *extra: str) -> float:
    """tokens/s of benchmarks/_bare_loop.py (the same GPT module, no framework around it; torch DDP on ranks > 1;
    ``--peer``: the simplest peer's model and optimizer instead)."""
    cmd = [*launcher(ranks), str(REPO / "benchmarks" / "_bare_loop.py"), data, "--threads", str(threads), "--micro",
           str(micro), "--accum", str(accum), "--steps", str(steps), "--block", str(block), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        raise SystemExit(f"bare loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])["tokens_per_s"]


def overhead_table(data: str, work: Path, steps: int, reps: int) -> None:
    """Table 0: llmtrain-train / bare loop, interleaved A/B/A/B so that drifts in machine speed hit both alike."""
    micro, accum, block = 8, 2, 128
    setups = [("1 process x 2 threads, ZeRO-0", 1, 2, 0), ("ZeRO-2, 2 ranks x 1 thread (bare: 2 threads)", 2, 1, 2)]
    rows = []
    for label, ranks, threads, stage in setups:
        mine, theirs, ddp = [], [], []
        for rep in range(reps):
            mine.append(ours(data, work, f"overhead-{stage}-{rep}", ranks, threads, "fp32", stage, steps, micro,
                             micro * accum, f"model.block_size={block}", bias=False)["tokens_per_s"])
            theirs.append(bare(data, 2, steps, micro, accum, block))
            if ranks > 1:  # the same data parallelism without llmtrain or DeepSpeed: torch DDP over gloo
                ddp.append(bare(data, threads, steps, micro, accum // ranks, block, ranks))
        rows.append([label, *pair_cells(mine, theirs),
                     " / ".join(f"{t:,.0f}" for t in ddp) or "-", f"{sum(mine) / sum(ddp):.3f}" if ddp else "-"])
    table(f"0a. small fp32, block {block}, global batch {micro * accum}: llmtrain-train vs the bare loop at 2 threads "
          f"(and vs a bare torch DDP loop on as many ranks; {reps} interleaved runs each, tok/s)",
          ["setup", "llmtrain-train", "bare loop", "ratio per pair", "median pair", "ratio of sums",
           "bare DDP loop", "ratio to DDP"], rows)
    rows = []
    for precision in ("fp32", "bf16"):
        n = steps if precision == "fp32" else 2 * steps  # bf16 steps take half the time
        speeds: dict[str, list[float]] = {"false": [], "true": []}
        for rep in range(reps):
            for flag in speeds:
                speeds[flag].append(ours(data, work, f"compile-{precision}-{flag}-{rep}", 1, 2, precision, 0, n, micro,
                                         micro * accum, f"model.block_size={block}", f"train.compile={flag}",
                                         bias=False)["tokens_per_s"])
        eager, compiled = (sum(speeds[flag]) / reps for flag in ("false", "true"))
        pairs = " / ".join(f"{c / e:.3f}" for e, c in zip(speeds["false"], speeds["true"], strict=True))
        rows.append([precision, f"{eager:,.0f}", f"{compiled:,.0f}", pairs, f"{compiled / eager:.3f}"])
    table(f"0b. the same, 1 process x 2 threads, ZeRO-0: train.compile=true vs false ({reps} interleaved pairs; tok/s "
          "after the first quarter of the steps, which holds the compile)", ["precision", "eager", "compiled",
                                                                             "speed-up per pair", "speed-up"], rows)


def peer_table(data: str, work: Path, steps: int, reps: int) -> None:
    """Table 0c: llmtrain-train / the simplest peer (benchmarks/_peer_gpt.py through _bare_loop.py --peer: a GPT-2
    block stack written for the benchmark, torch AdamW at its defaults, torch DDP on 2 ranks), the same shape, data
    and global batch, interleaved A/B/A/B."""
    micro, accum, block = 8, 2, 128
    setups = [("1 process x 2 threads, ZeRO-0, mlp=gelu (tanh)", 1, 2, 0, "gelu"),
              ("1 process x 2 threads, ZeRO-0, mlp=gelu_exact", 1, 2, 0, "gelu_exact"),
              ("2 ranks x 1 thread: ZeRO-2 vs DDP, mlp=gelu (tanh)", 2, 1, 2, "gelu")]
    rows = []
    for label, ranks, threads, stage, mlp in setups:
        mine, theirs = [], []
        for rep in range(reps):
            mine.append(ours(data, work, f"peer-{stage}-{mlp}-{rep}", ranks, threads, "fp32", stage, steps, micro,
                             micro * accum, f"model.block_size={block}", f"model.mlp={mlp}",
                             bias=False)["tokens_per_s"])
            theirs.append(bare(data, threads, steps, micro, accum // ranks, block, ranks, "--peer", "--mlp", mlp))
        rows.append([label, *pair_cells(mine, theirs)])
    table(f"0c. small fp32, block {block}, global batch {micro * accum}: llmtrain-train vs the simplest peer (a GPT-2 "
          f"block stack + torch AdamW defaults; torch DDP on 2 ranks), {reps} interleaved pairs each, tok/s",
          ["setup", "llmtrain-train", "peer", "ratio per pair", "median pair", "ratio of sums"], rows)
    rows = []
    for label, ranks, threads, stage, mlp in setups:
        r = alternate(data, ranks, threads, 4 * steps // 3, f"model.block_size={block}", f"model.mlp={mlp}",
                      f"dist.zero_stage={stage}", f"train.micro_batch_size={micro}",
                      f"train.global_batch_size={micro * accum}")
        rows.append([label, f"{r['ours_ms']:,.0f}", f"{r['peer_ms']:,.0f}", f"{r['median_ratio']:.3f}",
                     f"{r['mean_ratio']:.3f}", f"{r['ratio_of_sums']:.3f}"])
    table("0d. the same setups, the two training steps alternated step by step in one process per rank "
          f"(benchmarks/_alternate.py, {4 * steps // 3} pairs, the first 4 left out): ms per step and speed ratios",
          ["setup", "llmtrain ms", "peer ms", "median pair ratio", "mean pair ratio", "ratio of sums"], rows)


def alternate(data: str, ranks: int, threads: int, steps: int, *overrides: str) -> dict:
    """benchmarks/_alternate.py's JSON line: Trainer.train_step against the peer's step, alternated."""
    cmd = [*launcher(ranks), str(REPO / "benchmarks" / "_alternate.py"), "--steps", str(steps), "--",
           f"data.dir={data}", "model=small", "model.bias=false", "precision=fp32", "train.eval_windows=2", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode:
        raise SystemExit(f"alternation failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def hf_reference(vocab: int, precision: str, steps: int, micro: int, threads: int) -> float:
    """tokens/s of a plain loop over transformers' GPT-2 of the same shape, AdamW, same batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    cfg = GPT2Config(vocab_size=vocab, n_positions=SMALL["block_size"], n_embd=SMALL["n_embd"],
                     n_layer=SMALL["n_layer"], n_head=SMALL["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    x = torch.randint(0, vocab, (micro, SMALL["block_size"]))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for step in range(steps):
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= steps // 4:
            times.append(time.perf_counter() - start)
    return micro * SMALL["block_size"] * len(times) / sum(times)


def memory(data: str, work: Path, stage: int, model: str, steps: int) -> list[dict]:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "benchmarks" / "_memory_probe.py"),
           data, str(work / f"mem{stage}"), str(stage), model, str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"memory probe stage {stage} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


PREDICTED = re.compile(r"memory per rank, predicted: ([\d.]+) GB = .* activations ([\d.]+)")
TOO_BIG = re.compile(r"WARNING\] (predicted [\d.]+ GB per rank, more than .*)")


def long_run(data: str, work: Path, vocab: int, stage: int, length: int, sp: int, cgroup: Path | None = None) -> dict:
    """One long-context run of 2 steps under benchmarks/_step_memory.py: rank 0's predicted peak and activations (its
    start-up log line); its measured peak (the largest of the steps') and step 2's peak above what it held as the
    step began (step 1's also holds the Adam state it creates); tokens/s of step 2, and the exit status. Inside
    ``cgroup`` when given."""
    run_dir = work / f"long-{length}-sp{sp}{'-limited' if cgroup else ''}"
    # model.vocab_size given: the start-up prediction reads cfg.model, whose vocabulary is 0 (taken from the data).
    args = [f"data.dir={data}", f"run.dir={run_dir}", "model=small", "model.pos=rope", f"model.vocab_size={vocab}",
            f"model.block_size={length}", "precision=fp32", "dist.activation_checkpointing=true",
            "train.micro_batch_size=1", "train.global_batch_size=1", "train.max_steps=2", "train.log_every=1",
            "train.eval_every=0", "train.eval_windows=1", "train.checkpoint_every=0", "train.checkpoint_async=false",
            "optim.warmup_steps=1", "run.resume=restart", f"dist.zero_stage={stage}", f"dist.sequence_parallel={sp}"]
    cmd = [*launcher(sp), str(REPO / "benchmarks" / "_step_memory.py"), *args]
    enter = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    start = time.perf_counter()
    # DeepSpeed compiles its CPU communication extension at start-up where its cache does not match: in a folder of
    # this benchmark's own, the first run builds it (outside any limit) and the limited runs only load it.
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // sp), "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, preexec_fn=enter, env=env)
    predicted = PREDICTED.search(proc.stderr)
    if predicted is None:
        raise SystemExit(f"long context {length} sp={sp} logged no prediction:\n{proc.stderr[-3000:]}")
    steps = [json.loads(line.split(" ", 1)[1]) for line in proc.stderr.splitlines() if line.startswith("STEP_MEMORY ")]
    metrics = RunDir(run_dir).metrics
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "tokens_per_s" in r]
    if not cgroup and (proc.returncode or len(steps) < 2):
        raise SystemExit(f"long context {length} sp={sp} failed:\n{proc.stderr[-3000:]}")
    warning = TOO_BIG.search(proc.stderr)
    return {"predicted": float(predicted[1]), "activations": float(predicted[2]), "code": proc.returncode,
            "peak": max((s["peak_gb"] for s in steps), default=None), "steps": len(steps),
            "above_start": steps[-1]["above_start_gb"] if steps else None,
            "tokens_per_s": rows[-1]["tokens_per_s"] if rows else None, "warning": warning[1] if warning else "",
            "seconds": time.perf_counter() - start, "stderr": proc.stderr[-3000:]}


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A memory cgroup below this process's own, limited to ``limit`` bytes (no swap), that commands can be started
    in (``long_run``); None where this process may not make one. Removed on exit (its processes have ended)."""
    folder = None
    for cgroup in memory_cgroups(Path("/proc/self/cgroup").read_text(), Path("/sys/fs/cgroup")):
        # v2: the child needs the memory controller delegated to it; the swap limits exist where swap is accounted
        candidate = cgroup.folder / f"llmtrain-bench-{os.getpid()}"
        try:
            candidate.mkdir()
            (candidate / cgroup.limit_file).write_text(str(limit))
            if (candidate / cgroup.swap_limit_file).exists():
                (candidate / cgroup.swap_limit_file).write_text(str(limit if not cgroup.v2 else 0))
            folder = candidate
            break
        except OSError:
            with contextlib.suppress(OSError):
                candidate.rmdir()
    try:
        yield folder
    finally:
        if folder is not None:
            with contextlib.suppress(OSError):
                folder.rmdir()


def oom_kills(cgroup: Path) -> int:
    """Processes the kernel's OOM killer ended in ``cgroup`` (v2 memory.events, v1 memory.oom_control)."""
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(OSError):
            stats = dict(line.split() for line in (cgroup / name).read_text().splitlines())
            return int(stats.get("oom_kill", 0))
    return 0


def long_context_table(data: str, work: Path, vocab: int, stage: int, lengths: list[int], budget_gb: float) -> None:
    """Table 4: peak memory per rank of 1 rank against sequence parallel 2, by length; then the longest length on
    ranks of ``budget_gb`` each."""
    gb, longest = 2**30, max(lengths)
    runs = {(length, sp): long_run(data, work, vocab, stage, length, sp) for length in lengths for sp in (1, 2)
            if (length, sp) != (longest, 2)}
    with memory_cgroup(int(2 * budget_gb * gb)) as pair:  # the 2-rank run at the longest length, inside 2 x budget
        runs[longest, 2] = long_run(data, work, vocab, stage, longest, 2, pair)
        if pair is not None and runs[longest, 2]["code"]:
            raise SystemExit(f"sequence parallel 2 at {longest} failed inside {2 * budget_gb} GiB (oom_kill "
                             f"{oom_kills(pair)}); try a larger --long-budget-gb:\n{runs[longest, 2]['stderr']}")
    rows = []
    for length in lengths:
        part = {sp: runs[length, sp]["above_start"] for sp in (1, 2)}
        for sp in (1, 2):
            r = runs[length, sp]
            rows.append([length, "1 rank" if sp == 1 else "2 ranks, sp=2", f"{r['predicted']:.2f}", f"{r['peak']:.2f}",
                         f"{r['activations']:.2f}", f"{part[sp]:.2f}",
                         f"{part[2] / part[1]:.2f}" if sp == 2 else "", f"{r['tokens_per_s']:,.0f}"])
    table(f"4. small (RoPE) fp32, ZeRO-{stage}, activation checkpointing, micro-batch 1: peak resident memory per rank "
          f"(rank 0, GiB) by length; activation part = step 2's peak above what the rank held as step 2 began",
          ["length", "layout", "predicted", "measured", "predicted activations", "activation part",
           "sp=2 / sp=1", "tok/s"], rows)
    one, two = runs[longest, 1], runs[longest, 2]
    print(f"\nlength {longest} on ranks of {budget_gb} GiB: predicted 1 rank {one['predicted']:.2f} GiB "
          f"({'over' if one['predicted'] > budget_gb else 'under'}), sequence parallel 2 {two['predicted']:.2f} GiB "
          f"per rank ({'over' if two['predicted'] > budget_gb else 'under'})")
    with memory_cgroup(int(budget_gb * gb)) as alone:
        if alone is None:
            print("measured: no memory cgroup could be made here (root and a memory controller needed); the 1-rank "
                  "run is not started under a limit")
            return
        print(f"measured: sequence parallel 2 trained {two['steps']} steps inside {2 * budget_gb} GiB, peak "
              f"{two['peak']:.2f} GiB per rank (rank 0)")
        r = long_run(data, work, vocab, stage, longest, 1, alone)
        ended = (f"killed by the kernel's OOM killer in its {budget_gb} GiB cgroup (oom_kill {oom_kills(alone)})"
                 if r["code"] in (-9, 137) else f"exit status {r['code']}")
        print(f"measured: 1 rank inside {budget_gb} GiB: {ended} after {r['seconds']:.0f} s, {r['steps']} step(s) "
              f"logged; it warned at start-up: {r['warning'] or '(no warning)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data.dir (llmtrain-prepare data=stdlib ...)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["overhead", "peer", "single", "zero", "memory", "long"])
    parser.add_argument("--reps", type=int, default=3, help="table 0's interleaved pairs")
    parser.add_argument("--memory-model", default="350m", help="table 3's model preset (conf/model/)")
    parser.add_argument("--memory-stages", nargs="*", type=int, default=[0, 1, 2, 3], help="table 3's ZeRO stages")
    parser.add_argument("--long-lengths", nargs="*", type=int, default=[4096, 8192], help="table 4's lengths")
    parser.add_argument("--long-zero-stage", type=int, default=1, choices=[0, 1, 2, 3], help="table 4's ZeRO stage")
    parser.add_argument("--long-budget-gb", type=float, default=1.3,
                        help="table 4: the memory per rank the longest length is tried on")
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="table 1's precisions; bf16 runs --steps/6 steps (slow on CPUs without native bf16)")
    args = parser.parse_args()
    vocab = json.loads((Path(args.data) / "meta.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:  # run folders, each with its last checkpoint
        run_tables(args, vocab, Path(tmp))


def run_tables(args: argparse.Namespace, vocab: int, work: Path) -> None:
    if "overhead" not in args.skip:
        overhead_table(args.data, work, args.steps, args.reps)
    if "peer" not in args.skip:
        peer_table(args.data, work, args.steps, args.reps)

    if "single" not in args.skip:
        rows = []
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if precision not in args.precisions:
                continue
            torch.set_num_threads(2)
            peak = probe_peak(dtype, torch.device("cpu"), seconds=0.5)
            steps = args.steps if precision == "fp32" else max(4, args.steps // 6)
            mine = ours(args.data, work, f"single-{precision}", 1, 2, precision, 0, steps, args.micro, args.micro)
            theirs = hf_reference(vocab, precision, steps, args.micro, 2)
            flops = mine["mfu"] * peak / mine["tokens_per_s"]  # FLOPs per token, as llmtrain counts them
            rows.append([precision, f"{peak / 1e9:.1f}", f"{mine['tokens_per_s']:,.0f}", f"{mine['mfu']:.1%}",
                         f"{theirs:,.0f}", f"{flops * theirs / peak:.1%}", f"{mine['tokens_per_s'] / theirs:.2f}"])
        table("1. small, 1 process x 2 threads: llmtrain vs transformers GPT-2 + torch AdamW (MFU vs measured peak)",
              ["precision", "peak GFLOP/s", "ours tok/s", "ours MFU", "HF tok/s", "HF MFU", "ours/HF"], rows)

    if "zero" not in args.skip:
        gb = 2 * args.micro
        base = ours(args.data, work, "z-single", 1, 2, "fp32", 0, args.steps, args.micro, gb)
        rows = [["1 process, 2 threads, ZeRO-0", f"{base['tokens_per_s']:,.0f}", "1.00"]]
        for stage in (0, 1, 2, 3):
            r = ours(args.data, work, f"z{stage}-2", 2, 1, "fp32", stage, args.steps, args.micro, gb)
            rows.append([f"2 ranks x 1 thread, ZeRO-{stage}", f"{r['tokens_per_s']:,.0f}",
                         f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}"])
        table(f"2. small fp32, global batch {gb}: ZeRO stages on 2 ranks vs one process", ["setup", "tok/s", "ratio"],
              rows)

    if "memory" not in args.skip:
        rows, peaks = [], []
        for stage in args.memory_stages:
            r = max(memory(args.data, work, stage, args.memory_model, 2), key=lambda row: row["peak"])
            psi, n, gb = r["psi"], r["world"], 2**30
            formula = FP32_FORMULA[stage](n) * psi  # the ZeRO paper's accounting for fp32 Adam (K = 8)
            held = r["peak"] - r["baseline"]
            peaks.append(r["peak"])
            rows.append([stage, f"{psi / 1e6:.0f}M", f"{formula / gb:.2f}", f"{r['states'] / gb:.2f}",
                         f"{r['baseline'] / gb:.2f}", f"{r['peak'] / gb:.2f}", f"{held / gb:.2f}",
                         f"{held / formula:.2f}", f"{r['predicted'] / gb:.2f}", f"{r['step_s']:.1f}"])
        table(f"3. {args.memory_model} fp32, block 256, micro-batch 1, activation checkpointing, 2 ranks: the larger "
              "rank's peak resident memory (GiB) vs the ZeRO formula", ["stage", "Ψ", "formula", "state tensors",
                                                                         "baseline", "peak", "peak - baseline",
                                                                         "/ formula", "predicted", "s/step"], rows)
        monotone = all(a >= b for a, b in zip(peaks, peaks[1:], strict=False))
        print(f"stages monotone (ZeRO-3 <= ZeRO-2 <= ZeRO-1 <= ZeRO-0): {monotone}")

    if "long" not in args.skip:
        long_context_table(args.data, work, vocab, args.long_zero_stage, args.long_lengths, args.long_budget_gb)


if __name__ == "__main__":
    main()
