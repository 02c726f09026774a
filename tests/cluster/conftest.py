"""A real Slurm and real network namespaces: what the cluster tests need, and how they submit and wait.

Without Slurm (``sinfo`` answering) or without root and ``ip netns``, these tests skip -- unless CI asks for
them with ``LLMTRAIN_REQUIRE_CLUSTER=1`` (``.ci/run`` starts a one-node Slurm with ``scripts/slurm_local.sh``),
where a missing piece fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

REQUIRED = os.environ.get("LLMTRAIN_REQUIRE_CLUSTER") == "1"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
# The sync job of these tests: 2 ranks of the tiny model, ZeRO-2, fp32 (so resumed == uninterrupted bitwise).
SYNC = ["model=tiny", "train.max_steps=120", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.log_every=1", "train.eval_every=0", "train.eval_windows=40", "train.checkpoint_every=0",
        "optim.warmup_steps=5", "optim.lr=3e-3", "dist.zero_stage=2", "precision=fp32"]
ONE_NODE_CPU = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--export=ALL,NPROC_PER_NODE=2"]


def missing(reason: str):
    if REQUIRED:
        pytest.fail(f"LLMTRAIN_REQUIRE_CLUSTER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm() -> None:
    if shutil.which("sbatch") is None:
        missing("there is no Slurm here (bash scripts/slurm_local.sh starts one)")
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if out.returncode != 0 or not {"idle", "mixed"} & set(out.stdout.split()):
        missing(f"Slurm has no idle node ({(out.stderr or out.stdout).strip()[:200]})")


def sbatch(*args: str, env: dict | None = None) -> str:
    """Submit from the checkout (as a user would); the job id."""
    environ = {**os.environ, "LLMTRAIN_PYTHON": str(BIN / "python"), **(env or {})}
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=REPO, env=environ,
                         check=True)
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: str, states: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info["JobState"] in states:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still {job_info(job)['JobState']} after {timeout} s")


def wait_for_step(run_dir: Path, step: int, job: str, timeout: float = 180) -> None:
    """Until the run has logged ``step`` (the job is then well into its loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if logged_losses(run_dir) and max(logged_losses(run_dir)) >= step:
            return
        assert job_info(job)["JobState"] in {"PENDING", "RUNNING", "CONFIGURING"}, job_info(job)
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")


def logged_losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads(m.read_text())["step"] for m in (run_dir / "checkpoints").glob("step_*/COMPLETE.json"))


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout} s"
        time.sleep(0.2)
