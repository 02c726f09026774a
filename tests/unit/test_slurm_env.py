"""Hostfile, rendezvous and per-task ranks built from Slurm's variables (no Slurm needed)."""

from __future__ import annotations

import pytest

from llmtrain.distributed.slurm import (
    PORT_BASE,
    PORT_SPAN,
    expand_nodelist,
    expand_tasks_per_node,
    hostfile,
    main,
    node_env,
    task_ranks,
)


@pytest.mark.parametrize("nodelist, names", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("vm", ["vm"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x-[5]", ["x-5"]),
    ("dgx-a100-[001-002],cpu[1-2]", ["dgx-a100-001", "dgx-a100-002", "cpu1", "cpu2"]),
])
def test_expand_nodelist(nodelist, names):
    assert expand_nodelist(nodelist) == names


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "node[a-b]", "node[5-3]"])
def test_bad_nodelist_is_refused(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


JOB = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_NODEID": "2",
       "SLURM_GPUS_ON_NODE": "8"}


def test_node_env_for_torchrun():
    env = node_env(JOB)
    assert env == {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node01",
                   "MASTER_PORT": str(PORT_BASE + 123456 % PORT_SPAN), "NPROC_PER_NODE": "8"}
    assert env["MASTER_PORT"] == "18456"
    # what the user set wins; CPU nodes (no GPUs) take NPROC_PER_NODE from the user, else 1
    pinned = node_env({**JOB, "MASTER_PORT": "29500", "SLURM_GPUS_ON_NODE": "", "NPROC_PER_NODE": "2"})
    assert pinned["MASTER_PORT"] == "29500" and pinned["NPROC_PER_NODE"] == "2"
    assert node_env({**JOB, "SLURM_GPUS_ON_NODE": ""})["NPROC_PER_NODE"] == "1"
    assert node_env({**JOB, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4"})["NPROC_PER_NODE"] == "4"


def test_hostfile():
    assert hostfile(JOB) == "node01 slots=8\nnode02 slots=8\nnode03 slots=8\nnode07 slots=8\n"


def test_task_ranks_of_srun_tasks():
    step = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
            "SLURM_STEP_NODELIST": "cn[7-10]"}
    assert task_ranks(step) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "7", "LOCAL_WORLD_SIZE": "2",
                                "MASTER_ADDR": "cn7", "MASTER_PORT": str(PORT_BASE + 77)}
    assert task_ranks({**step, "SLURM_NODEID": "3"})["LOCAL_WORLD_SIZE"] == "1"
    # the batch script (no step) and a one-task step are single processes
    batch = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}
    assert task_ranks(batch) is None
    assert task_ranks({**step, "SLURM_STEP_NUM_TASKS": "1"}) is None


def test_cli_outside_a_job_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    assert main(["env"]) == 2
    assert capsys.readouterr().err.strip() == ("llmtrain.distributed.slurm: error: not inside a Slurm job "
                                              "(SLURM_JOB_NODELIST is unset)")


def test_cli_env_and_net(monkeypatch, capsys):
    for k, v in JOB.items():
        monkeypatch.setenv(k, v)
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "GLOO_SOCKET_IFNAME",
                "LOCAL_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert main(["env"]) == 0
    assert "export MASTER_ADDR=node01\n" in capsys.readouterr().out
    assert main(["net", "127.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert "export LOCAL_ADDR=127.0.0.1\n" in out and "export GLOO_SOCKET_IFNAME=lo\n" in out
