"""A real Slurm and real network namespaces: what the cluster tests need, and how they submit and wait.

Without Slurm (``sinfo`` answering) or without root and ``ip netns``, these tests skip -- unless CI asks for
them with ``LLMTRAIN_REQUIRE_CLUSTER=1`` (``.ci/run`` starts a one-node Slurm with ``scripts/slurm_local.sh`` and a
two-node one beside it with ``scripts/slurm_local.sh --nodes 2``), where a missing piece fails instead. The helpers
take ``conf``: the slurm.conf of the cluster to talk to (None: the default one).
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
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
# The cluster of `scripts/slurm_local.sh --nodes 2`: node1 and node2, each in a network namespace of this name.
TWO_NODES_CONF = "/etc/slurm/llmtrain-2nodes/slurm.conf"
TWO_NODES = ("node1", "node2")


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


@pytest.fixture(scope="session")
def two_nodes() -> str:
    """The two-node cluster of ``scripts/slurm_local.sh --nodes 2``: its slurm.conf, once both nodes are idle."""
    if os.geteuid() != 0 or shutil.which("sbatch") is None or shutil.which("ip") is None:
        missing("the two-node Slurm needs root, Slurm and iproute2 (bash scripts/slurm_local.sh --nodes 2 starts it)")
    if not Path(TWO_NODES_CONF).is_file():
        missing("there is no two-node Slurm here (bash scripts/slurm_local.sh --nodes 2 starts one)")
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                         env=slurm_env(TWO_NODES_CONF))
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    if out.returncode != 0 or sorted(n for n, s in states.items() if s == "idle") != list(TWO_NODES):
        missing(f"the two-node Slurm's nodes are not idle ({(out.stderr or out.stdout).strip()[:200]})")
    return TWO_NODES_CONF


def slurm_env(conf: str | None, env: dict | None = None) -> dict[str, str]:
    environ = {**os.environ, **(env or {})}
    if conf:
        environ["SLURM_CONF"] = conf
    return environ


def sbatch(*args: str, env: dict | None = None, conf: str | None = None) -> str:
    """Submit from the checkout (as a user would); the job id."""
    environ = slurm_env(conf, {"LLMTRAIN_PYTHON": str(BIN / "python"), **(env or {})})
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=REPO, env=environ,
                         check=True)
    return out.stdout.strip().split(";")[0]


def job_info(job: str, conf: str | None = None) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True,
                         env=slurm_env(conf)).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: str, states: set[str], timeout: float, conf: str | None = None) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job, conf)
        if info["JobState"] in states:
            return info
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=slurm_env(conf))
    raise AssertionError(f"job {job} still {job_info(job, conf)['JobState']} after {timeout} s")


def wait_for_step(run_dir: Path, step: int, job: str, timeout: float = 180, conf: str | None = None) -> None:
    """Until the run has logged ``step`` (the job is then well into its loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if logged_losses(run_dir) and max(logged_losses(run_dir)) >= step:
            return
        assert job_info(job, conf)["JobState"] in {"PENDING", "RUNNING", "CONFIGURING"}, job_info(job, conf)
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")


def preempt_and_requeue(job: str, run_dir: Path, after_step: int, max_steps: int,
                        conf: str | None = None) -> tuple[dict, int, str]:
    """Send the pre-emption signal once ``after_step`` is logged, check the stop and the requeue, let the requeued
    job start and wait for its end: (final job info, the step it stopped at, the job's log)."""
    out = Path(f"{run_dir}.out")
    wait_for_step(run_dir, after_step, job, conf=conf)
    # what --signal=USR1@120 sends at the limit
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=slurm_env(conf))
    info = wait_for(job, {"PENDING"} | DONE, timeout=120, conf=conf)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, out.read_text(errors="replace")[-3000:])
    stopped_at = checkpoint_steps(run_dir)
    assert len(stopped_at) == 1 and after_step <= stopped_at[0] < max_steps
    # Slurm holds a requeued job back for the credential lifetime (scripts/slurm_local.sh: cred_expire=10 s)
    info = wait_for(job, DONE, timeout=600, conf=conf)
    log = out.read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "requeueing job" in log and f"resumed from {run_dir}/checkpoints/step_{stopped_at[0]:08d}" in log
    assert not (run_dir / "PREEMPTED").exists()
    return info, stopped_at[0], log


@pytest.fixture(scope="session")
def uninterrupted(slurm, prepared_small, tmp_path_factory) -> Path:
    """slurm/train.sbatch on the one-node Slurm: 2 ranks (one torchrun on the node), ZeRO-2, 120 steps, through to
    the end. The reference of the pre-empted, launcher and sweep jobs on one node and on two."""
    run_dir = tmp_path_factory.mktemp("slurm") / "sync"
    job = sbatch(*ONE_NODE_CPU, f"--output={run_dir}.out", "slurm/train.sbatch", f"data.dir={prepared_small}",
                 f"run.dir={run_dir}", *SYNC)
    info = wait_for(job, DONE, timeout=600)
    log = Path(f"{run_dir}.out").read_text(errors="replace")  # several srun tasks may split a character
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    return run_dir


def job_processes(job: str):
    """(pid, environment, command line) of every llmtrain process of ``job`` on this machine, found by its
    environment as an operator would with ps."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            cmdline = (entry / "cmdline").read_text()
        except OSError:
            continue
        if environ.get("SLURM_JOB_ID") == job and "llmtrain.cli.train" in cmdline:
            yield int(entry.name), environ, cmdline


def logged_losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads(m.read_text())["step"] for m in (run_dir / "checkpoints").glob("step_*/COMPLETE.json"))


def wait_until(condition, timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout} s"
        time.sleep(every)


# The settings of tests/conftest.py's small_data_config, as overrides: the same prepare as `prepared_small`.
SMALL_PREPARE = ["data=stdlib", "data.max_documents=150", "data.vocab_size=1024", "data.tokenizer_sample_documents=100",
                 "data.shard_tokens=50000", "data.num_proc=1", "data.val_fraction=0.05"]


def submit_prepare(num_tasks: int, out: Path, logs: Path, python: Path, sbatch_opts: str = "--cpus-per-task=1",
                   conf: str | None = None) -> dict[str, str]:
    """bash slurm/prepare.sh: the job ids it printed (plan, tasks = the array, merge)."""
    env = slurm_env(conf, {"LLMTRAIN_PYTHON": str(python),
                           "SBATCH_OPTS": f"{sbatch_opts} --time=10 --output={logs}/%x-%j.out"})
    proc = subprocess.run(["bash", "slurm/prepare.sh", str(num_tasks), *SMALL_PREPARE, f"data.dir={out}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = re.fullmatch(r"plan (\d+), tasks (\d+)_\[0-\d+\], merge (\d+)\n", proc.stdout)
    assert found, proc.stdout
    return dict(zip(("plan", "tasks", "merge"), found.groups(), strict=True))


def phase_logs(logs: Path, since_job: int) -> dict[str, str]:
    """The logs of the prepare jobs numbered ``since_job`` or later, by their data.task (slurm/prepare.sbatch's
    first line names it)."""
    found = {}
    for path in logs.glob("llmtrain-prepare-*.out"):
        text = path.read_text(errors="replace")
        task = re.search(r"^llmtrain-prepare: job (\d+) on .*: data.task=(\S+)$", text, re.M)
        if task and int(task.group(1)) >= since_job:
            found[task.group(2)] = text
    return found


def assert_same_prepared(merged_dir: Path, one_dir: Path) -> None:
    """Token for token and document for document, the same prepared folder."""
    import numpy as np

    from llmtrain.data.reader import PreparedData

    merged, one = PreparedData(merged_dir), PreparedData(one_dir)
    assert merged.tokenizer_fingerprint == one.tokenizer_fingerprint
    for split in ("train", "val"):
        tokens = [np.concatenate([np.asarray(s) for s in d.split(split).shards]) for d in (merged, one)]
        assert np.array_equal(*tokens)
        assert merged.meta["splits"][split]["documents"] == one.meta["splits"][split]["documents"]
