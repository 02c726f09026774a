"""The slurm/ templates submitted with sbatch to a real (one-node) Slurm: sync ZeRO-2, pre-emption -> requeue
-> resume, the parameter-server job, a failed rank, the deepspeed launcher, and a Hydra/Submitit sweep."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import (
    DONE,
    ONE_NODE_CPU,
    SYNC,
    assert_same_prepared,
    checkpoint_steps,
    job_processes,
    logged_losses,
    phase_logs,
    preempt_and_requeue,
    sbatch,
    submit_prepare,
    wait_for,
    wait_for_step,
)
from tests.conftest import BIN, REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_sync_zero2_job_finishes_with_a_checkpoint(uninterrupted):
    losses = logged_losses(uninterrupted)
    assert sorted(losses) == list(range(1, 121))
    assert checkpoint_steps(uninterrupted) == [120]
    assert losses[120] < losses[1] - 1.0  # it learned (6.93 -> ~5.4 measured)
    log = Path(f"{uninterrupted}.out").read_text(errors="replace")
    assert "step 120: val_loss" in log and "2 rank(s)" in log
    assert not (uninterrupted / "PREEMPTED").exists()


def test_preempted_job_checkpoints_requeues_and_ends_as_if_uninterrupted(uninterrupted, prepared_small, tmp_path):
    run_dir = tmp_path / "preempted"
    job = sbatch(*ONE_NODE_CPU, f"--output={run_dir}.out", "slurm/train.sbatch", f"data.dir={prepared_small}",
                 f"run.dir={run_dir}", *SYNC)
    _, stopped_at, log = preempt_and_requeue(job, run_dir, after_step=15, max_steps=120)
    assert f"stopped at step {stopped_at} with a checkpoint" in log
    # every step, the ones after the requeue included, equals the uninterrupted job's (fp32: bitwise)
    assert logged_losses(run_dir) == logged_losses(uninterrupted)


def test_parameter_server_job_is_preempted_requeued_and_finishes(slurm, prepared_small, tmp_path):
    """slurm/ps.sbatch: 1 server + 2 workers as 3 srun tasks (ranks from SLURM_PROCID); the signal reaches all
    three, server 0 stops the run at a step boundary with a checkpoint, the job requeues and finishes."""
    run_dir = tmp_path / "ps"
    job = sbatch("--ntasks=3", "--cpus-per-task=1", f"--output={run_dir}.out", "slurm/ps.sbatch",
                 f"data.dir={prepared_small}", f"run.dir={run_dir}", "ps.num_servers=1",
                 *[a for a in SYNC if not a.startswith(("dist.", "train.max_steps"))], "train.max_steps=300")
    _, _, log = preempt_and_requeue(job, run_dir, after_step=10, max_steps=300)
    assert "step 300: val_loss" in log
    assert sorted(logged_losses(run_dir)) == list(range(1, 301))
    assert checkpoint_steps(run_dir)[-1] == 300
    assert (run_dir / "checkpoints" / "step_00000300" / "ps0.pt").is_file()


def _pid_of_rank(job: str, rank: int) -> int:
    """The trainer process of ``rank`` in ``job`` (not its launcher)."""
    for pid, environ, cmdline in job_processes(job):
        if environ.get("RANK") == str(rank) and "torch.distributed.run" not in cmdline:
            return pid
    raise AssertionError(f"no process of rank {rank} in job {job}")


def test_a_failed_rank_ends_the_job_quickly_and_is_named(slurm, prepared_small, tmp_path):
    run_dir = tmp_path / "killed"
    args = [a for a in SYNC if not a.startswith("train.max_steps")] + ["train.max_steps=100000"]
    job = sbatch(*ONE_NODE_CPU, f"--output={run_dir}.out", "slurm/train.sbatch", f"data.dir={prepared_small}",
                 f"run.dir={run_dir}", *args)
    wait_for_step(run_dir, 5, job)
    os.kill(_pid_of_rank(job, 1), 9)
    killed = time.monotonic()
    info = wait_for(job, DONE, timeout=120)
    seconds = time.monotonic() - killed
    log = Path(f"{run_dir}.out").read_text(errors="replace")
    print(f"\nrank 1 SIGKILLed: job {info['JobState']} exit {info['ExitCode']} {seconds:.1f} s later")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0"
    assert seconds < 60
    root_cause = log[log.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "Signal 9 (SIGKILL)" in root_cause
    assert "llmtrain: error: job step failed with exit code 1" in log


def test_deepspeed_launcher_with_a_hostfile_from_the_allocation(uninterrupted, prepared_small, tmp_path):
    run_dir = tmp_path / "ds"
    args = [a for a in SYNC if not a.startswith("train.max_steps")] + ["train.max_steps=10"]
    cmd = " ".join(["bash", "scripts/deepspeed.sh", f"data.dir={prepared_small}", f"run.dir={run_dir}", *args])
    job = sbatch("--nodes=1", "--cpus-per-task=2", f"--output={run_dir}.out", "--export=ALL,NPROC_PER_NODE=2",
                 f"--wrap={cmd}")
    info = wait_for(job, DONE, timeout=600)
    log = Path(f"{run_dir}.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    hostfile = Path(f"/tmp/llmtrain-hostfile-{job}").read_text()
    assert hostfile == f"{info['NodeList']} slots=2\n"
    # the same 2-rank job as the torchrun one: its first 10 steps are that job's (its lr schedule differs
    # only by max_steps, which cosine decay reads: compare step 1..5 inside warm-up, identical for both)
    mine, theirs = logged_losses(run_dir), logged_losses(uninterrupted)
    assert [mine[s] for s in range(1, 6)] == [theirs[s] for s in range(1, 6)]


def test_hydra_submitit_sweep_submits_one_job_per_setting(uninterrupted, prepared_small, tmp_path):
    """slurm/sweep.sh: one job per setting, each with 2 ranks as srun tasks (ranks read from SLURM_PROCID)."""
    sweep = tmp_path / "sweep"
    args = [a for a in SYNC if not a.startswith(("train.max_steps", "optim.lr"))]
    env = {**os.environ, "SWEEP_DIR": str(sweep), "TASKS_PER_NODE": "2", "CPUS_PER_TASK": "1", "TIME_MIN": "10",
           "LLMTRAIN_PYTHON": str(BIN / "python")}
    proc = subprocess.run(["bash", "slurm/sweep.sh", f"data.dir={prepared_small}", *args, "train.max_steps=10",
                           "optim.lr=3e-3,1e-2"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # submitit submits the settings as one Slurm job array: <array id>_<index> per setting
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and tasks[0].endswith("_0") and tasks[1].endswith("_1")
    losses = {}
    for num, lr in (("0", "0.003"), ("1", "0.01")):
        run_dir = sweep / num
        assert checkpoint_steps(run_dir) == [10]
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
        losses[lr] = logged_losses(run_dir)
    assert losses["0.003"][10] != losses["0.01"][10]
    # 2 srun ranks train like torchrun's 2 ranks: the warm-up steps (lr independent of max_steps) are equal
    assert [losses["0.003"][s] for s in range(1, 6)] == [logged_losses(uninterrupted)[s] for s in range(1, 6)]


def test_prepare_array_with_a_failed_task_then_resubmitted_equals_one_process(slurm, prepared_small, tmp_path):
    """slurm/prepare.sh with K=2: task 1 fails the first time (its python exits 1), which cancels the merge and
    leaves no meta.json; the same command again redoes only task 1 and merges token for token what one process
    writes."""
    from llmtrain.data.tasks import work_folder
    from tests.conftest import small_data_config

    out, logs, fail = tmp_path / "d", tmp_path / "logs", tmp_path / "fail-task-1"
    logs.mkdir()
    fail.touch()
    python = tmp_path / "python"  # the job's python; array task 1 fails while `fail` exists
    python.write_text(f'#!/bin/bash\nif [ "$SLURM_ARRAY_TASK_ID" = 1 ] && [ -e {fail} ]; then\n'
                      f'  echo "simulated failure of task 1" >&2; exit 1\nfi\nexec {BIN / "python"} "$@"\n')
    python.chmod(0o755)

    first = submit_prepare(2, out, logs, python)
    info = wait_for(first["merge"], DONE | {"CANCELLED"}, timeout=300)
    assert info["JobState"] == "CANCELLED", info  # --kill-on-invalid-dep: never pending forever, never run
    assert wait_for(f"{first['tasks']}_1", DONE, timeout=60)["JobState"] == "FAILED"
    assert wait_for(f"{first['tasks']}_0", DONE, timeout=60)["JobState"] == "COMPLETED"
    work = work_folder(out, small_data_config(out))
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["plan", "task_0"]

    fail.unlink()
    again = submit_prepare(2, out, logs, python)
    info = wait_for(again["merge"], DONE | {"CANCELLED"}, timeout=300)
    merge_log = (logs / f"llmtrain-prepare-{again['merge']}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), merge_log[-3000:]
    redone = phase_logs(logs, since_job=int(again["plan"]))
    assert sorted(redone) == ["0", "1", "merge", "plan"]
    assert "data.task=plan has nothing to do" in redone["plan"]
    assert "data.task=0 has nothing to do" in redone["0"]
    assert "has nothing to do" not in redone["1"] and "task 1: documents [75, 150)" in redone["1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "logs", "python"]  # the work folder is gone
    assert_same_prepared(out, prepared_small)
