"""What a Slurm allocation tells a launcher: its nodes, the rendezvous host and port, the hostfile, the ranks.

Pure functions of the environment (a dict), so they are tested without Slurm. The shell wrappers in
``scripts/`` read them through the command line:

    python -m llmtrain.distributed.slurm env            # NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE
    python -m llmtrain.distributed.slurm hostfile FILE  # the deepspeed launcher's hostfile: "<node> slots=<G>" per node
    python -m llmtrain.distributed.slurm net HOST       # LOCAL_ADDR and the *_SOCKET_IFNAME that reach HOST
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import socket
import sys
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 15000, 20000  # a job's rendezvous port lies in [15000, 35000), derived from its id
# Each library that opens its own sockets reads its own variable naming the interface to use.
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list as names: ``node[01-03,07],gpu-a`` -> node01 node02 node03 node07 gpu-a.

    Several bracket groups in one name multiply out (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2); ranges keep
    their zero padding. ``scontrol show hostnames`` does the same inside a job; this works without Slurm.
    """
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices = [_expand_brackets(p[1:-1], nodelist) if p.startswith("[") else [p] for p in parts if p]
        names += ["".join(combo) for combo in itertools.product(*choices)]
    return names


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
    return [i for i in items + [current] if i]


def _expand_brackets(body: str, whole: str) -> list[str]:
    out = []
    for piece in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
        if not m:
            raise ValueError(f"cannot read {piece!r} in Slurm node list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {piece!r} in Slurm node list {whole!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` as a count per node: ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for piece in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", piece.strip())
        if not m:
            raise ValueError(f"cannot read {piece!r} in SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def job_port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else one derived from the job id: every task of the job computes the same port."""
    if environ.get("MASTER_PORT"):
        return int(environ["MASTER_PORT"])
    return PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % PORT_SPAN


def gpus_per_node(environ: Mapping[str, str]) -> int:
    """GPUs Slurm gave this node (``--gpus-per-node``/``--gres``), 0 when it gave none."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = environ.get(key, "")
        m = re.search(r"(\d+)$", value)  # "4" or "a100:4"
        if m:
            return int(m.group(1))
    return 0


def node_env(environ: Mapping[str, str]) -> dict[str, str]:
    """One launcher per node: the node count, this node's rank, the rendezvous host/port, processes per node.

    ``NPROC_PER_NODE`` is the GPUs on the node, or the ``NPROC_PER_NODE`` already set (on CPU nodes).
    Values set in the environment win, so a user can pin any of them.
    """
    nodes = expand_nodelist(environ["SLURM_JOB_NODELIST"])
    nproc = environ.get("NPROC_PER_NODE") or str(gpus_per_node(environ) or 1)
    return {
        "NNODES": environ.get("NNODES") or str(len(nodes)),
        "NODE_RANK": environ.get("NODE_RANK") or environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or nodes[0],
        "MASTER_PORT": str(job_port(environ)),
        "NPROC_PER_NODE": nproc,
    }


def hostfile(environ: Mapping[str, str]) -> str:
    """The deepspeed launcher's hostfile for the allocation: ``<node> slots=<processes per node>``."""
    slots = int(node_env(environ)["NPROC_PER_NODE"])
    return "".join(f"{node} slots={slots}\n" for node in expand_nodelist(environ["SLURM_JOB_NODELIST"]))


def task_ranks(environ: Mapping[str, str]) -> dict[str, str] | None:
    """RANK & co. of a process that ``srun`` started as one task per rank (no torchrun); None otherwise.

    Only inside a job step with more than one task: the batch script itself also carries ``SLURM_PROCID=0``,
    and a one-task step is a plain single process.
    """
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1 or "SLURM_PROCID" not in environ:
        return None
    per_node = expand_tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])
    nodes = expand_nodelist(environ["SLURM_STEP_NODELIST"])
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_WORLD_SIZE": str(per_node[int(environ.get("SLURM_NODEID", "0"))]),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or nodes[0],
        "MASTER_PORT": str(job_port(environ)),
    }


def node_at(address: str, environ: Mapping[str, str]) -> str | None:
    """The node of this job (``SLURM_JOB_NODELIST``) whose name resolves to ``address``; None outside a Slurm job or
    when no node's does. The names are looked up as the launchers look up the rendezvous host."""
    if "SLURM_JOB_NODELIST" not in environ:
        return None
    for node in expand_nodelist(environ["SLURM_JOB_NODELIST"]):
        try:
            if node == address or any(info[4][0] == address for info in socket.getaddrinfo(node, None)):
                return node
        except OSError:  # a name that does not resolve here is not the one
            continue
    return None


def route_to(host: str) -> tuple[str, str | None]:
    """This machine's address on the path to ``host``, and the name of the interface holding it.

    Hosts with several interfaces (a management network, Docker's, InfiniBand) are where multi-node jobs hang:
    gloo, NCCL and TensorPipe would otherwise guess from the hostname.
    """
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))  # UDP: picks the route, sends nothing
        local = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return local, name
    return local, None


def net_env(host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """LOCAL_ADDR and the interface variables for reaching ``host`` (those already set are kept)."""
    local, ifname = route_to(host)
    out = {"LOCAL_ADDR": environ.get("LOCAL_ADDR") or local}
    if ifname:
        out.update({var: environ.get(var) or ifname for var in IFNAME_VARS})
    return out


def _exports(values: Mapping[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.distributed.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("env", help="export lines: NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE")
    sub.add_parser("hostfile", help="write the deepspeed hostfile").add_argument("file")
    sub.add_parser("net", help="export lines: LOCAL_ADDR and *_SOCKET_IFNAME towards HOST").add_argument("host")
    args = parser.parse_args(argv)
    try:
        if args.what == "net":
            sys.stdout.write(_exports(net_env(args.host, os.environ)))
            return 0
        if "SLURM_JOB_NODELIST" not in os.environ:
            raise ValueError("not inside a Slurm job (SLURM_JOB_NODELIST is unset)")
        if args.what == "env":
            sys.stdout.write(_exports(node_env(os.environ)))
        else:
            with open(args.file, "w") as f:
                f.write(hostfile(os.environ))
    except (ValueError, OSError) as exc:
        print(f"llmtrain.distributed.slurm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
