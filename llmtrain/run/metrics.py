"""Metrics on rank 0: a progress bar, ``metrics.jsonl`` and wandb; MFU against a known or measured peak.

MFU = achieved model FLOPs / peak FLOPs, with training FLOPs per token = 6N + 12*L*H*Q*T (PaLM appendix B,
as in nanoGPT; N = non-embedding parameters) -- activation recomputation is not counted as useful work.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llmtrain.config import WandbConfig, WandbMode
from llmtrain.errors import UserError
from llmtrain.run.rundir import RunDir

log = logging.getLogger("llmtrain")

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, SXM parts.
KNOWN_BF16_PEAKS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of repeated (size x size) @ (size x size) matmuls: the attainable peak on this host."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The peak FLOP/s of one device for MFU, and where the number came from."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, flops in KNOWN_BF16_PEAKS.items():
            if key in name:
                return flops, f"{name} data sheet"
    return probe_peak(dtype, device), f"measured {dtype} matmul on {device.type}"


def probe_peak(dtype: torch.dtype, device: torch.device, seconds: float = 0.1) -> float:
    """The best FLOP/s over growing square sizes (``seconds`` each), stopping where a size gains less than 5% on the
    one before (the host's peak is reached) or before one matmul would take long: CPUs without native bf16 run a
    2048^3 bf16 matmul for about a minute, and fastest on small matrices. About 0.3-0.5 s on a CPU."""
    best = 0.0
    for size in (256, 512, 1024, 2048):
        flops = measure_matmul_peak(dtype, device, size, seconds)
        if flops < 1.05 * best:
            return max(best, flops)
        best = flops
        if 2 * (2 * size) ** 3 / flops > seconds:  # the next size's single matmul would overrun the budget
            break
    return best


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def drop_torn_last_line(path: Path) -> None:
    """A run killed while appending a row can leave half a line; cut it off, so the resumed run's rows stay
    one JSON object per line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:  # from the end, a block at a time: a long run's file is never read whole
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            pos = start
        f.truncate(0)


def last_scores(run: RunDir, step: int) -> dict[str, float]:
    """The last evaluation ``metrics.jsonl`` holds at or before ``step`` (empty when there is none): what a re-run
    of a finished run reports, as it trains and evaluates nothing."""
    scores: dict[str, float] = {}
    if not run.metrics.is_file():
        return scores
    with open(run.metrics) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a torn last line
                continue
            if "val_loss" in row and row.get("step", 0) <= step:
                scores = {k: v for k, v in row.items() if k.startswith(("val_loss", "val_ppl"))}
    return scores


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class MetricsLogger:
    """Writes on rank 0 only; every other rank gets a logger that does nothing.

    Progress: a redrawn bar on a terminal; when stderr is a file (Slurm's output, nohup, CI) one plain ASCII
    log line per logged step instead -- a bar's carriage returns and block characters do not belong in a file
    (and several tasks writing one file can split a multi-byte character).
    """

    def __init__(self, run: RunDir, enabled: bool, wandb_cfg: WandbConfig, config: dict[str, Any],
                 total_steps: int, start_step: int) -> None:
        self.enabled = enabled
        self.wandb = None
        self.bar = None
        self.total_steps = total_steps
        if not enabled:
            return
        self.path = run.metrics
        drop_torn_last_line(self.path)
        if stderr_is_terminal():
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if wandb_cfg.mode != WandbMode.disabled:
            self.wandb = self._start_wandb(run, wandb_cfg, config)

    @staticmethod
    def _start_wandb(run: RunDir, cfg: WandbConfig, config: dict[str, Any]):
        import wandb

        id_file = run.wandb_id  # the same wandb run continues after an auto-resume
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        try:
            started = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run.path.name,
                                 group=cfg.group, id=run_id, resume="allow", dir=str(run.path), mode=cfg.mode.value,
                                 config=config)
        except wandb.errors.Error as exc:  # no API key, no network, a wrong entity: one line, not a traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"wandb.mode={cfg.mode.value} could not start the W&B run ({first}); log in (wandb login "
                            f"or WANDB_API_KEY) or use wandb.mode=offline") from None
        id_file.write_text(run_id)
        return started

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **row, "time": time.time()}  # wall clock: loss vs time plots
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if "loss" in row and self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}", refresh=False)
        elif "loss" in row:
            log.info("step %d/%d: loss %.4f, %s tokens/s", step, self.total_steps, row["loss"],
                     f"{row.get('tokens_per_s', 0):,.0f}")
        if "val_loss" in row:
            per_source = "".join(f" ({k.removeprefix('val_loss/')} {v:.4f})" for k, v in row.items()
                                 if k.startswith("val_loss/"))
            log.info("step %d: val_loss %.4f, val_ppl %.2f%s", step, row["val_loss"], row["val_ppl"], per_source)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
