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


def _launch(run_dir, data_dir, steps: int, env: dict, netns: str | None = None) -> subprocess.Popen:
    args = [a for a in SYNC if not a.startswith("train.max_steps")] + [f"train.max_steps={steps}"]
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
