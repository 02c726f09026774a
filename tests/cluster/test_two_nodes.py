"""The slurm/ templates on a two-node Slurm (``scripts/slurm_local.sh --nodes 2``: node1 and node2, each a network
namespace with its own hostname and address on a bridge): sync ZeRO-2 with one torchrun per node against the
one-node cluster's 2 ranks, pre-emption, the deepspeed launcher, a Submitit sweep of two-node jobs, the prepare
array, the parameter-server job across the nodes, and a node lost mid-run (sync and parameter-server jobs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import (
    DONE,
    SYNC,
    assert_same_prepared,
    checkpoint_steps,
    job_processes,
    logged_losses,
    phase_logs,
    preempt_and_requeue,
    sbatch,
    slurm_env,
    submit_prepare,
    wait_for,
    wait_for_step,
)
from tests.conftest import BIN, REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
# One rank per node and one thread per rank: the two nodes share this machine's cores, and the one-node job's
# torchrun gives each of its 2 ranks one thread (kernels may sum in another order with another thread count).
PER_NODE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
            "--export=ALL,NPROC_PER_NODE=1,OMP_NUM_THREADS=1"]
# dist.timeout_s of the node-loss job. Its survivor fails at once (the lost rank's connections close), but the job
# ends when Slurm declares the node DOWN (about 25 s on scripts/slurm_local.sh's cluster, SlurmdTimeout=5).
TIMEOUT_S = 60


def netns(node: str) -> str:
    return f"llmtrain-{node}"  # scripts/slurm_local.sh's name for the node's network namespace


def received_bytes(node: str) -> int:
    """Bytes the node has received over its link to the bridge so far."""
    out = subprocess.run(["ip", "-n", netns(node), "-s", "-j", "link", "show", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)[0]["stats64"]["rx"]["bytes"]


def kill_node(node: str) -> None:
    """What a node's death does to a job: its slurmd, its job steps and their processes end at once (SIGKILL to
    everything in the node's network namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", netns(node)], capture_output=True, text=True,
                          check=True).stdout.split()
    assert pids
    for pid in pids:
        os.kill(int(pid), 9)


def restart_nodes() -> str:
    """``scripts/slurm_local.sh --nodes 2`` again: starts a killed node's slurmd and resumes it; what it said."""
    proc = subprocess.run(["bash", "scripts/slurm_local.sh", "--nodes", "2"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def node_state(node: str, conf: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, check=True,
                         env=slurm_env(conf)).stdout
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    return fields["State"], re.search(r"Reason=(.*?)(?: \[|$)", out, re.M).group(1) if "Reason=" in out else ""


def ranks_by_node(job: str) -> dict[str, list[int]]:
    """The ranks (SLURM_PROCID) of the job's llmtrain processes on each node."""
    found: dict[str, set[int]] = {}
    for _, environ, _ in job_processes(job):
        if "SLURM_PROCID" in environ:
            found.setdefault(environ["SLURMD_NODENAME"], set()).add(int(environ["SLURM_PROCID"]))  # and its children
    return {node: sorted(ranks) for node, ranks in found.items()}


@pytest.fixture(autouse=True)
def cancel_left_jobs(two_nodes):
    """A test that fails mid-way leaves no job of its own running into the next one."""
    before = set(queued_jobs(two_nodes))
    yield
    left = set(queued_jobs(two_nodes)) - before
    if left:
        subprocess.run(["scancel", *sorted(left)], env=slurm_env(two_nodes))


def queued_jobs(conf: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True,
                          env=slurm_env(conf)).stdout.split()


@pytest.fixture
def lost_node(two_nodes):
    """Kills a node (``kill_node``); whatever the test does, both nodes are back in service after it."""
    yield kill_node
    restart_nodes()


def test_sync_zero2_on_two_nodes_preempted_ends_as_the_one_node_job(uninterrupted, two_nodes, prepared_small,
                                                                    tmp_path):
    """slurm/train.sbatch with --nodes=2 (one torchrun per node, 1 rank each), pre-empted once: it stops with a
    checkpoint, requeues, resumes, and every step's loss is the one-node 2-rank job's, bitwise: the same ranks, data
    and one thread each (the 1e-6 relative bound a looser layout would need holds a fortiori)."""
    run_dir = tmp_path / "sync"
    before = received_bytes("node2")
    job = sbatch(*PER_NODE, f"--output={run_dir}.out", "slurm/train.sbatch", f"data.dir={prepared_small}",
                 f"run.dir={run_dir}", *SYNC, conf=two_nodes)
    info, stopped_at, log = preempt_and_requeue(job, run_dir, after_step=15, max_steps=120, conf=two_nodes)
    received = received_bytes("node2") - before
    print(f"\npre-empted at step {stopped_at}; node2 received {received / 2**20:.1f} MiB")
    assert info["NodeList"] == "node[1-2]" and "on node[1-2]" in log and "2 rank(s)" in log
    assert f"stopped at step {stopped_at} with a checkpoint" in log
    assert received > 2**20  # the gradients crossed the bridge (the model has 0.3M parameters)
    losses, reference = logged_losses(run_dir), logged_losses(uninterrupted)
    assert sorted(losses) == list(range(1, 121)) and checkpoint_steps(run_dir)[-1] == 120
    before_stop = [s for s in losses if s <= stopped_at]
    assert [losses[s] for s in before_stop] == [reference[s] for s in before_stop], "2 nodes x 1 rank != 1 x 2"
    assert losses == reference, "the requeued job did not resume as the uninterrupted one went on"


def test_deepspeed_launcher_over_two_nodes(uninterrupted, two_nodes, prepared_small, tmp_path):
    """scripts/deepspeed.sh in a 2-node job: the hostfile lists both nodes, its srun starts a rank on each."""
    run_dir = tmp_path / "ds"
    args = [a for a in SYNC if not a.startswith("train.max_steps")] + ["train.max_steps=10"]
    cmd = " ".join(["bash", "scripts/deepspeed.sh", f"data.dir={prepared_small}", f"run.dir={run_dir}", *args])
    before = received_bytes("node2")
    job = sbatch(*PER_NODE, f"--output={run_dir}.out", f"--wrap={cmd}", conf=two_nodes)
    info = wait_for(job, DONE, timeout=600, conf=two_nodes)
    log = Path(f"{run_dir}.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert Path(f"/tmp/llmtrain-hostfile-{job}").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert "2 rank(s)" in log and received_bytes("node2") - before > 2**20
    # warm-up steps (their learning rate does not depend on max_steps) equal the one-node torchrun job's
    mine, theirs = logged_losses(run_dir), logged_losses(uninterrupted)
    assert [mine[s] for s in range(1, 6)] == [theirs[s] for s in range(1, 6)]


def test_submitit_sweep_of_two_node_jobs(uninterrupted, two_nodes, prepared_small, tmp_path):
    """slurm/sweep.sh with NODES=2: each setting's job spans both nodes, one rank per node as srun tasks."""
    sweep = tmp_path / "sweep"
    args = [a for a in SYNC if not a.startswith(("train.max_steps", "optim.lr"))]
    env = slurm_env(two_nodes, {"SWEEP_DIR": str(sweep), "NODES": "2", "TASKS_PER_NODE": "1", "CPUS_PER_TASK": "1",
                                "TIME_MIN": "10", "OMP_NUM_THREADS": "1", "LLMTRAIN_PYTHON": str(BIN / "python")})
    proc = subprocess.run(["bash", "slurm/sweep.sh", f"data.dir={prepared_small}", *args, "train.max_steps=10",
                           "optim.lr=3e-3,1e-2"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2
    for task in tasks:  # submitit returns once each job's result is written; Slurm ends the job just after
        info = wait_for(task, DONE, timeout=60, conf=two_nodes)
        assert (info["JobState"], info["NodeList"], info["NumTasks"]) == ("COMPLETED", "node[1-2]", "2"), info
    losses = {num: logged_losses(sweep / num) for num in ("0", "1")}
    assert checkpoint_steps(sweep / "0") == checkpoint_steps(sweep / "1") == [10]
    assert losses["0"][10] != losses["1"][10]
    # the lr=3e-3 job is the one-node torchrun job's first steps (warm-up: lr independent of max_steps)
    assert [losses["0"][s] for s in range(1, 6)] == [logged_losses(uninterrupted)[s] for s in range(1, 6)]


def test_prepare_array_tasks_on_both_nodes_equal_one_process(two_nodes, prepared_small, tmp_path):
    """slurm/prepare.sh with K=2, each job owning a whole node (--exclusive): the two tokenize tasks run on
    different nodes at once, and the merge is token for token the one-process prepare."""
    out, logs = tmp_path / "d", tmp_path / "logs"
    logs.mkdir()
    jobs = submit_prepare(2, out, logs, BIN / "python", "--cpus-per-task=1 --exclusive", conf=two_nodes)
    info = wait_for(jobs["merge"], DONE, timeout=300, conf=two_nodes)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    hosts = {task: re.search(r"^llmtrain-prepare: job \d+ on (\S+):", text, re.M).group(1)
             for task, text in phase_logs(logs, since_job=int(jobs["plan"])).items()}
    assert sorted(hosts) == ["0", "1", "merge", "plan"]
    assert {hosts["0"], hosts["1"]} == {"node1", "node2"}
    assert_same_prepared(out, prepared_small)


def test_parameter_servers_keep_going_when_a_worker_node_is_lost(two_nodes, lost_node, prepared_small, tmp_path):
    """slurm/ps.sbatch on 2 nodes: server 0 and worker 0 on node1, worker 1 on node2. node2 dies mid-run; the
    server goes on with worker 0, finishes the run, and the job (--no-kill) completes."""
    run_dir = tmp_path / "ps"
    job = sbatch("--nodes=2", "--ntasks=3", "--cpus-per-task=1",
                 "--export=ALL,OMP_NUM_THREADS=1", f"--output={run_dir}.out", "slurm/ps.sbatch",
                 f"data.dir={prepared_small}", f"run.dir={run_dir}", "ps.num_servers=1", "ps.timeout_s=20",
                 *[a for a in SYNC if not a.startswith(("dist.", "train.max_steps"))], "train.max_steps=200",
                 conf=two_nodes)
    wait_for_step(run_dir, 10, job, conf=two_nodes)
    assert ranks_by_node(job) == {"node1": [0, 1], "node2": [2]}
    lost_node("node2")
    killed = time.monotonic()
    info = wait_for(job, DONE, timeout=300, conf=two_nodes)
    seconds = time.monotonic() - killed
    log = Path(f"{run_dir}.out").read_text(errors="replace")
    print(f"\nnode2 killed at step 10: job {info['JobState']} {info['ExitCode']} {seconds:.1f} s later")
    assert sorted(logged_losses(run_dir)) == list(range(1, 201)), log[-3000:]
    assert checkpoint_steps(run_dir)[-1] == 200
    assert "1 worker(s) were lost (silent for more than ps.timeout_s=20 s); the others finished the run" in log
    assert "step 200: val_loss" in log
    # --no-kill: Slurm neither ends nor requeues the job; srun names the lost node and counts its task out
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    assert "srun: error: Node failure on node2" in log


def test_a_lost_node_ends_the_job_and_a_resubmitted_job_resumes(uninterrupted, two_nodes, lost_node, prepared_small,
                                                                tmp_path):
    """node2 (slurmd, job step, rank) SIGKILLed mid-run: the job ends within dist.timeout_s, with one line naming
    node2. Once node2 is back (``scontrol update nodename=node2 state=resume``), the same command resumes from the last
    complete checkpoint and ends with the uninterrupted job's losses."""
    run_dir = tmp_path / "lost"
    # --no-requeue: ended, not requeued by Slurm, so that the resubmission below is the only next run (a requeued
    # job keeps its id, and the controller's delayed retry of the lost step's kill can hit the new step of that id)
    submit = [*PER_NODE, "--no-requeue", f"--output={run_dir}.out", "slurm/train.sbatch", f"data.dir={prepared_small}",
              f"run.dir={run_dir}", *SYNC, "train.checkpoint_every=20", f"dist.timeout_s={TIMEOUT_S}"]
    job = sbatch(*submit, conf=two_nodes)
    wait_for_step(run_dir, 45, job, conf=two_nodes)
    lost_node("node2")
    killed = time.monotonic()
    info = wait_for(job, DONE, timeout=TIMEOUT_S + 60, conf=two_nodes)
    seconds = time.monotonic() - killed
    log = Path(f"{run_dir}.out").read_text(errors="replace")
    lines = re.findall(r"^llmtrain-train: error: lost node node2 .*$", log, re.M)
    print(f"\nnode2 killed after step 45: job {info['JobState']} {info['ExitCode']} {seconds:.1f} s later; {lines}")
    assert seconds < TIMEOUT_S
    assert info["JobState"] == "NODE_FAIL" and "srun: error: Node failure on node2" in log, log[-3000:]
    assert len(lines) == 1, log[-3000:]  # the rest of the line: the address and what the backend saw
    state, reason = node_state("node2", two_nodes)
    assert state.startswith("DOWN") and "Not responding" in reason, (state, reason)
    last = checkpoint_steps(run_dir)[-1]
    assert 40 <= last < 120

    said = restart_nodes()  # node2's slurmd again, and `scontrol update nodename=node2 state=resume`
    assert "node2 is down: scontrol update nodename=node2 state=resume" in said
    again = sbatch(*submit, conf=two_nodes)
    info = wait_for(again, DONE, timeout=600, conf=two_nodes)
    log = Path(f"{run_dir}.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{last:08d}" in log
    assert logged_losses(run_dir) == logged_losses(uninterrupted)


def test_a_second_job_on_another_node_adds_a_worker_to_the_parameter_servers(two_nodes, prepared_small, tmp_path):
    """slurm/ps.sbatch over gRPC: the job (server 0 and worker 0) on node1; a second sbatch with ps.join=true on node2
    reads the servers' address from the shared run folder and adds a worker. Both jobs complete, and the budget's
    units of data are applied once each, by both workers."""
    run_dir = tmp_path / "ps"
    # worker 0 computes 4x slower, so that the budget is still far from spent when the second job has started
    args = [f"data.dir={prepared_small}", f"run.dir={run_dir}", "ps.num_servers=1", "ps.transport=grpc",
            "ps.timeout_s=30", *[a for a in SYNC if not a.startswith(("dist.", "train.max_steps"))],
            "train.max_steps=200", "train.slow_rank_factor=4"]
    options = ["--nodes=1", "--cpus-per-task=1", "--export=ALL,OMP_NUM_THREADS=1"]
    job = sbatch(*options, "--ntasks=2", "--nodelist=node1", f"--output={run_dir}.out", "slurm/ps.sbatch", *args,
                 conf=two_nodes)
    wait_for_step(run_dir, 10, job, conf=two_nodes)
    joined = sbatch(*options, "--ntasks=1", "--nodelist=node2", f"--output={run_dir}.joined.out", "slurm/ps.sbatch",
                    *args, "ps.join=true", conf=two_nodes)
    info = wait_for(job, DONE, timeout=300, conf=two_nodes)
    joined_info = wait_for(joined, DONE, timeout=60, conf=two_nodes)
    log = Path(f"{run_dir}.out").read_text(errors="replace")
    joined_log = Path(f"{run_dir}.joined.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert (joined_info["JobState"], joined_info["ExitCode"]) == ("COMPLETED", "0:0"), joined_log[-3000:]
    assert "worker 1 joined the job" in log and "step 200: val_loss" in log
    rows = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines()]
    by_worker = {w: sum(len(r["units"]) for r in rows if r["worker"] == w) for w in (0, 1)}
    print(f"\nunits applied per worker: {by_worker}")
    assert by_worker[1] > 0
    assert sorted(u for r in rows for u in r["units"]) == list(range(200))
