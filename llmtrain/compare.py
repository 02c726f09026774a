"""Sync ZeRO against async parameter servers on the same model, data, token budget and compute ranks.

Runs ``llmtrain-train`` once per mode (sync: N data-parallel ranks; async: N workers + 1 server; optionally async
with the staleness-aware learning rate, and DiLoCo once per H of ``compare.inner_steps``), each in its own run
folder under ``compare.dir`` and in one wandb group, then writes loss-vs-tokens and loss-vs-wall-clock plots, the
staleness histogram and a table (with the bytes each compute rank sends + receives per token it trains on). With
``compare.slow_rank_factor`` above 1 every mode runs again with a straggler (``train.slow_rank_factor``: the last
compute rank sleeps factor - 1 times its measured compute time after each micro-batch), in ``compare.dir/slow-<f>``,
and the plots put the two scenarios side by side.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmtrain.config import Algorithm, CompareConfig, Mode, parallel_problems
from llmtrain.errors import UserError
from llmtrain.run.rundir import RunDir
from llmtrain.run.setup import check_data_dir


@dataclass
class ModeRun:
    name: str
    run: RunDir
    overrides: list[str]
    """The mode's settings (run.dir is added from ``run``)."""
    ranks: int
    slow_rank_factor: float = 1.0
    started: float = 0.0
    wall_s: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def steps(self) -> list[dict]:
        return [r for r in self.rows if "loss" in r]

    def evals(self) -> list[dict]:
        return [r for r in self.rows if "val_loss" in r]


def plan(cfg: CompareConfig) -> list[ModeRun]:
    n, out = cfg.compare.compute_ranks, Path(cfg.compare.dir)
    group = cfg.wandb.group or out.name
    runs = []
    for factor in sorted({1.0, cfg.compare.slow_rank_factor}):
        # Both modes run at the config's precision (bf16 by default; experiment=demo sets fp32).
        common = [f"wandb.group={group}"]
        folder = out
        if factor != 1.0:
            common.append(f"train.slow_rank_factor={factor}")
            folder = out / f"slow-{factor:g}"
        modes = [("sync", "sync", ["mode=sync"], n),
                 ("async", "async", ["mode=async_ps", "ps.num_servers=1", "ps.staleness_lr=false"], n + 1)]
        if cfg.compare.staleness_lr:
            modes.append(("async+staleness-lr", "async-slr", ["mode=async_ps", "ps.num_servers=1",
                                                                "ps.staleness_lr=true"], n + 1))
        round_mode = "sync rounds" if cfg.compare.sync_rounds else "async rounds"
        modes += [(f"diloco H={h} ({round_mode})", f"diloco-h{h}", diloco_overrides(cfg, h), n + 1)
                  for h in cfg.compare.inner_steps]
        runs += [ModeRun(name, RunDir(folder / sub), [*common, *mode], ranks, factor)
                 for name, sub, mode, ranks in modes]
    return runs


def diloco_overrides(cfg: CompareConfig, inner_steps: int) -> list[str]:
    return ["mode=async_ps", "ps.num_servers=1", "ps.staleness_lr=false", "ps.algorithm=diloco",
            f"ps.inner_steps={inner_steps}", f"ps.sync_rounds={str(cfg.compare.sync_rounds).lower()}"]


def check_diloco(cfg: CompareConfig) -> None:
    """Each DiLoCo run's config, checked before the first run starts (its steps must end rounds)."""
    for h in cfg.compare.inner_steps:
        ps = dataclasses.replace(cfg.ps, algorithm=Algorithm.diloco, inner_steps=h, staleness_lr=False,
                                 sync_rounds=cfg.compare.sync_rounds)
        try:
            dataclasses.replace(cfg, mode=Mode.async_ps, ps=ps)
        except ValueError as exc:
            raise UserError(f"compare.inner_steps={h}: {exc}") from None


def launch(run: ModeRun, user_overrides: list[str]) -> None:
    """One training run through torchrun on this node; its metrics are read back from metrics.jsonl."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.ranks}",
           "-m", "llmtrain.cli.train", *user_overrides, *run.overrides, f"run.dir={run.run.path}"]
    print(f"[{run.name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    run.started = time.time()
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    run.wall_s = time.time() - run.started
    if proc.returncode:
        raise UserError(f"the {run.name} run failed (exit {proc.returncode}); its log is above, its folder "
                        f"{run.run.path}")
    run.rows = [json.loads(line) for line in run.run.metrics.read_text().splitlines()]


def table(runs: list[ModeRun]) -> str:
    header = ("mode", "compute ranks", "slow rank", "tokens", "wall s (with start-up)", "tokens/s", "val loss",
              "val ppl", "bytes/token", "staleness mean / p95 / max")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        steps, final = run.steps(), run.evals()[-1]
        stale = "-"
        if "staleness_mean" in steps[-1]:
            stale = (f"{np.mean([r['staleness_mean'] for r in steps]):.2f} / "
                     f"{max(r['staleness_p95'] for r in steps):.1f} / {max(r['staleness_max'] for r in steps)}")
        tokens_per_s = np.mean([r["tokens_per_s"] for r in steps[1:] or steps])
        lines.append(f"| {run.name} | {run.ranks if run.name == 'sync' else run.ranks - 1} | "
                     f"x{run.slow_rank_factor:g} | {steps[-1]['tokens_seen']:,} | {run.wall_s:.0f} | "
                     f"{tokens_per_s:,.0f} | "
                     f"{final['val_loss']:.4f} | {final['val_ppl']:.2f} | "
                     f"{np.mean([r['bytes_per_token'] for r in steps]):,.0f} | {stale} |")
    return "\n".join(lines)


def plot(runs: list[ModeRun], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    factors = sorted({run.slow_rank_factor for run in runs})
    for x_key, label, name in (("tokens_seen", "tokens", "loss_vs_tokens.png"),
                               ("time", "wall-clock seconds since launch", "loss_vs_time.png")):
        fig, axes = plt.subplots(1, len(factors), figsize=(6.4 * len(factors), 4.2), sharey=True, squeeze=False)
        for ax, factor in zip(axes[0], factors, strict=True):  # one panel per scenario, side by side
            for i, run in enumerate(r for r in runs if r.slow_rank_factor == factor):
                xs = [r[x_key] - (run.started if x_key == "time" else 0) for r in run.steps()]
                ax.plot(xs, [r["loss"] for r in run.steps()], color=f"C{i}", label=f"{run.name} (train)", alpha=0.7)
                evals = run.evals()
                ex = [(e["time"] - run.started) if x_key == "time" else
                      next(r["tokens_seen"] for r in run.steps() if r["step"] >= e["step"]) for e in evals]
                ax.plot(ex, [e["val_loss"] for e in evals], "o--", color=f"C{i}", label=f"{run.name} (val)")
            ax.set_title("no straggler" if factor == 1.0 else f"one compute rank x{factor:g} slower")
            ax.set_xlabel(label)
            ax.set_ylabel("loss (nats/token)")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, run in enumerate(runs):
        hists = [np.array(r["staleness_hist"]) for r in run.steps() if "staleness_hist" in r]
        if hists:
            total = np.zeros(max(len(h) for h in hists))
            for h in hists:
                total[: len(h)] += h
            width = 0.8 / len(runs)
            ax.bar(np.arange(len(total)) + width * i, total, width=width, color=f"C{i}",
                   label=run.name if run.slow_rank_factor == 1.0 else f"{run.name}, x{run.slow_rank_factor:g}")
    ax.set_xlabel("staleness (server updates between pull and apply)")
    ax.set_ylabel("updates")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "staleness_hist.png", dpi=110)
    plt.close(fig)
    return [*written, out / "staleness_hist.png"]


def compare(cfg: CompareConfig, user_overrides: list[str]) -> str:
    check_data_dir(cfg.data)  # the runs would each refuse it, after compare.dir was made
    refused = parallel_problems(cfg.model, cfg.dist, Mode.async_ps)  # the async runs would, after the sync one
    if refused:
        raise UserError(refused[0])
    check_diloco(cfg)
    out = Path(cfg.compare.dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(cfg)
    for run in runs:
        launch(run, user_overrides)
    result = table(runs)
    (out / "table.md").write_text(result + "\n")
    plot(runs, out)
    return result
