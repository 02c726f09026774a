"""Multi-node without a cluster: two network namespaces act as two nodes, each with its own address, joined by
torchrun's c10d rendezvous through scripts/torchrun.sh. Sync ZeRO-2 across the "nodes" must give the losses of
the same world size on one node, and its traffic must have crossed the link between them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.cluster.conftest import SYNC, logged_losses, missing, wait_until
from tests.conftest import BIN, REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
ADDR = {"a": "10.77.0.1", "b": "10.77.0.2"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """Namespaces llmt<pid>a / llmt<pid>b joined by a veth pair (10.77.0.1 <-> 10.77.0.2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        missing("network namespaces need root and iproute2's ip")
    tag = f"llmt{os.getpid() % 100000}"
    names = {n: f"{tag}{n}" for n in ADDR}
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for n, ns in names.items():
            _ip("link", "set", f"{tag}v{n}", "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ADDR[n]}/24", "dev", f"{tag}v{n}")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", f"{tag}v{n}", "up")
    except subprocess.CalledProcessError as exc:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        missing(f"cannot make network namespaces here: {exc.stderr.strip()}")
    yield names, tag
    for ns in names.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _launch(run_dir, data_dir, steps: int, env: dict, netns: str | None = None,
            extra: list[str] | tuple = ()) -> subprocess.Popen:
    overridden = ("train.max_steps=", *(e.split("=")[0] + "=" for e in extra))
    args = [a for a in SYNC if not a.startswith(overridden)] + [f"train.max_steps={steps}", *extra]
    cmd = ["bash", "scripts/torchrun.sh", f"data.dir={data_dir}", f"run.dir={run_dir}", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    # One thread per rank in both layouts: torchrun sets OMP_NUM_THREADS=1 only when it starts more than one
    # rank per node, and kernels may sum in another order with another thread count (bitwise equality below).
    environ = {**os.environ, "LLMTRAIN_PYTHON": str(BIN / "python"), "OMP_NUM_THREADS": "1", **env}
    for var in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "LOCAL_ADDR", "SLURM_JOB_NODELIST"):
        environ.pop(var, None)
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_namespace_nodes_train_like_one_node(two_nodes, prepared_small, tmp_path):
    names, tag = two_nodes
    steps = 20
    nodes = [_launch(tmp_path / "two", prepared_small, steps,
                     {"NNODES": "2", "NODE_RANK": str(i), "MASTER_ADDR": ADDR["a"], "MASTER_PORT": "29611",
                      "NPROC_PER_NODE": "1"}, netns=names[n])
             for i, n in enumerate(ADDR)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    one = _launch(tmp_path / "one", prepared_small, steps, {"NPROC_PER_NODE": "2", "MASTER_PORT": "29612"})
    log = one.communicate(timeout=600)[0]
    assert one.returncode == 0, log[-3000:]

    two_losses = logged_losses(tmp_path / "two")
    assert sorted(two_losses) == list(range(1, steps + 1))
    assert two_losses == logged_losses(tmp_path / "one")  # fp32, same ranks and data: bitwise
    assert "2 rank(s)" in logs[0]
    # the gradients really went between the "nodes": megabytes over the veth link (the model has 0.3M params)
    stats = subprocess.run(["ip", "-n", names["b"], "-s", "-j", "link", "show", f"{tag}vb"], capture_output=True,
                           text=True, check=True).stdout
    received = json.loads(stats)[0]["stats64"]["rx"]["bytes"]
    print(f"\nnode b received {received / 2**20:.1f} MiB over the veth link in {steps} steps")
    assert received > 2**20


def test_a_dead_node_ends_the_other_within_seconds(two_nodes, prepared_small, tmp_path):
    """Node b's trainer is SIGKILLed mid-run: node a's torchrun must exit non-zero soon, not hang."""
    names, _ = two_nodes
    run_dir = tmp_path / "dead"
    nodes = [_launch(run_dir, prepared_small, 100000,
                     {"NNODES": "2", "NODE_RANK": str(i), "MASTER_ADDR": ADDR["a"], "MASTER_PORT": "29613",
                      "NPROC_PER_NODE": "1"}, netns=names[n])
             for i, n in enumerate(ADDR)]
    wait_until(lambda: len(logged_losses(run_dir)) >= 5, timeout=300)
    pids = subprocess.run(["ip", "netns", "pids", names["b"]], capture_output=True, text=True).stdout.split()
    trainers = [p for p in pids if "llmtrain.cli.train" in open(f"/proc/{p}/cmdline").read()
                and "torch.distributed.run" not in open(f"/proc/{p}/cmdline").read()]
    assert len(trainers) == 1
    os.kill(int(trainers[0]), 9)
    killed = time.monotonic()
    log_a = nodes[0].communicate(timeout=300)[0]
    seconds = time.monotonic() - killed
    log_b = nodes[1].communicate(timeout=300)[0]
    print(f"\nnode a's torchrun exited {nodes[0].returncode} {seconds:.1f} s after node b's rank was killed")
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert seconds < 60
    # node b's agent names the dead rank; node a's rank names the peer it lost, in one line
    assert "rank      : 1 (local_rank: 0)" in log_b and "Signal 9 (SIGKILL)" in log_b
    assert "llmtrain.cli.train FAILED" in log_a
    assert re.search(rf"^llmtrain-train: error: lost {re.escape(ADDR['b'])}: connection .* by peer; ", log_a, re.M)


ELASTIC = {"NNODES": "1:2", "MAX_RESTARTS": "3", "NPROC_PER_NODE": "1", "MASTER_ADDR": ADDR["a"],
           # drop a silent node after 3 s and close a round 2 s after its minimum is there (torch: 15 s and 30 s)
           "RDZV_CONF": "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=2"}


def _trainers(netns: str) -> set[int]:
    """The trainer processes (not torchrun's agent) in a namespace node."""
    found = set()
    for pid in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split():
        try:
            cmd = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if "llmtrain.cli.train" in cmd and "torch.distributed.run" not in cmd and "--check" not in cmd:
            found.add(int(pid))
    return found


def test_an_elastic_job_goes_on_without_a_lost_node_and_grows_back(two_nodes, prepared_small, tmp_path):
    """torchrun's elastic agents (NNODES=1:2, MAX_RESTARTS=3, c10d rendezvous on node a): every process of node b is
    SIGKILLed mid-run; node a re-forms the job alone and resumes from the newest checkpoint on 1 rank; a new agent on
    node b makes it grow back to 2 ranks at the next restart (node a's rank saves a checkpoint on the agent's SIGTERM
    first). No resubmit, and the losses of an uninterrupted one-process run, within 1e-5 (ZeRO-2 resumes across world
    sizes exactly). Prints the time the failure cost, by part."""
    names, _ = two_nodes
    run_dir, steps = tmp_path / "elastic", 200
    extra = ["train.checkpoint_every=5", "train.slow_rank_factor=4"]  # slow enough that node b comes back in time

    def node(n: str, rank: int) -> subprocess.Popen:
        return _launch(run_dir, prepared_small, steps, {**ELASTIC, "NODE_RANK": str(rank), "MASTER_PORT": "29615"},
                       netns=names[n], extra=extra)

    nodes = [node("a", 0), node("b", 1)]
    wait_until(lambda: len(logged_losses(run_dir)) >= 12, timeout=300)
    before = logged_losses(run_dir)
    first = _trainers(names["a"])
    rows = _rows(run_dir)
    step_s = (rows[-1]["time"] - rows[1]["time"]) / (len(rows) - 2)
    killed = time.time()
    for pid in subprocess.run(["ip", "netns", "pids", names["b"]], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), 9)
    last_before = max(logged_losses(run_dir))
    wait_until(lambda: not _trainers(names["a"]) & first, timeout=120, every=0.05)
    detected = time.time()
    wait_until(lambda: _trainers(names["a"]) - first, timeout=120, every=0.05)
    restarted = time.time()
    wait_until(lambda: any(r["time"] > restarted for r in _rows(run_dir)), timeout=120, every=0.05)
    resumed_row = next(r for r in _rows(run_dir) if r["time"] > restarted)
    nodes[1].wait(timeout=60)
    nodes[1] = node("b", 1)  # node b is back: a new agent joins the rendezvous
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)

    resumed_at = resumed_row["step"] - 1
    redone = last_before - resumed_at
    parts = [("detection (node a's rank exits)", detected - killed),
             ("rendezvous and start of the new rank", restarted - detected),
             ("resume (load, universal conversion) and first step", resumed_row["time"] - restarted),
             (f"the {redone} step(s) since the checkpoint of step {resumed_at}, again", redone * step_s)]
    print("\ntime lost to the failure of node b: " + "; ".join(f"{what} {s:.1f} s" for what, s in parts)
          + f"; total {sum(s for _, s in parts):.1f} s")
    log_a = logs[0]
    assert "(step 1, saved" not in log_a and "1 rank(s) = 1 data" in log_a  # went on alone, from a checkpoint
    assert re.search(r"resumed from \S+ \(step \d+, saved on 1 ranks\)", log_a)  # grew back from a 1-rank one
    assert "signal SIGTERM: saving a checkpoint at the end of this step" in log_a  # the agent's restart lost no step
    elastic = logged_losses(run_dir)
    assert sorted(elastic) == list(range(1, steps + 1))
    assert all(elastic[s] == before[s] for s in range(1, resumed_at + 1))  # history kept up to the checkpoint
    reference = _launch(tmp_path / "one", prepared_small, steps, {"NPROC_PER_NODE": "1", "MASTER_PORT": "29616"},
                        extra=["train.checkpoint_every=5"])
    assert reference.wait(timeout=600) == 0
    one = logged_losses(tmp_path / "one")
    gap = max(abs(elastic[s] - one[s]) / one[s] for s in one)
    print(f"largest relative loss gap to the uninterrupted 1-process run over {steps} steps: {gap:.1e}")
    assert gap <= 1e-5


def _rows(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]
