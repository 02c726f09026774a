"""Training runs shared by the integration tests: launched once per session and cached by configuration."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

STEPS = 20
COMMON = ["model=tiny", f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=4",
          "train.log_every=1", "train.eval_every=10", "train.eval_windows=40", "train.checkpoint_every=0",
          "optim.warmup_steps=5", "optim.lr=3e-3"]
_CACHE: dict[tuple, tuple[Path, subprocess.CompletedProcess]] = {}


def launch(run_dir: Path, data_dir: Path, ranks: int, *overrides: str, check: bool = True,
           common: list[str] = COMMON):
    """Train with `llmtrain-train` (1 rank) or `torchrun --nproc_per_node 2 -m llmtrain.cli.train`."""
    args = [f"data.dir={data_dir}", f"run.dir={run_dir}", *common, *overrides]
    if ranks == 1:
        cmd = [str(BIN / "llmtrain-train"), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "llmtrain.cli.train",
               *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.fixture(scope="session")
def run(prepared_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")

    def _run(name: str, ranks: int, *overrides: str) -> Path:
        key = (name, ranks, overrides)
        if key not in _CACHE:
            run_dir = root / name
            launch(run_dir, prepared_small, ranks, *overrides)
            _CACHE[key] = run_dir
        return _CACHE[key]

    return _run


