"""The launcher's environment, read in one place: rank, world size, device, backend.

Works the same under ``torchrun``, the ``deepspeed`` launcher, ``srun`` and as a plain single process
(then a one-rank group on a free loopback port is made). On a host without CUDA, DeepSpeed's CPU
accelerator is selected before DeepSpeed is imported, so users set nothing.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
from dataclasses import dataclass

import torch

from llmtrain.distributed.slurm import net_env, task_ranks
from llmtrain.errors import AgreedError, UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_vars() -> tuple[int, int, int, int]:
    """RANK/LOCAL_RANK/WORLD_SIZE from torchrun, the deepspeed launcher or ``srun`` (one task per rank); a single
    process otherwise."""
    if "RANK" not in os.environ and (slurm := task_ranks(os.environ)) is not None:
        os.environ.update(slurm)
        os.environ.update(net_env(slurm["MASTER_ADDR"], os.environ))  # the interface that reaches rank 0
    if "RANK" in os.environ:
        die_with_launcher()
    else:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
    return rank, local_rank, world, local_world


def rendezvous_host() -> str:
    """The host of the launcher's rendezvous (MASTER_ADDR, where process 0 runs), once ``launcher_vars`` ran."""
    return os.environ.get("MASTER_ADDR", "127.0.0.1")


def launcher_rank() -> int:
    """This process's rank as its launcher gave it (RANK, or an ``srun`` task's), 0 for a single process; reads the
    environment without changing it (``launcher_vars`` fills it in)."""
    rank = os.environ.get("RANK") or (task_ranks(os.environ) or {}).get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher() -> None:
    """A rank started by a launcher (torchrun's agent, the deepspeed launcher, an srun task) is killed when
    that parent exits, however it exits: otherwise a ``kill -9`` of torchrun leaves its ranks training on alone
    and writing into run.dir. Linux's PR_SET_PDEATHSIG; elsewhere nothing changes."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def select_accelerator() -> bool:
    """Tell DeepSpeed to use its CPU accelerator when there is no CUDA (must run before importing deepspeed)."""
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return has_cuda


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Join (or make) the process group; pick the device and the CPU threads of this rank."""
    has_cuda = select_accelerator()
    rank, local_rank, world, local_world = launcher_vars()
    if backend == "auto":
        backend = "nccl" if has_cuda else "gloo"
    if backend == "nccl" and not has_cuda:
        raise AgreedError("dist.backend=nccl needs CUDA; this host has none (use dist.backend=auto or gloo)")
    if has_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        share_cores(local_world)
    import deepspeed

    quiet_deepspeed()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               verbose=False)
    return DistEnv(rank, local_rank, world, local_world, device, backend)


def share_cores(local_world: int) -> None:
    """Ranks on one host share its cores instead of oversubscribing them (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def rpc_env(cpu_ranks: int = 0) -> DistEnv:
    """This process's place in a job that talks over RPC (the parameter-server mode; no process group): ranks from
    the launcher; ranks below ``cpu_ranks`` stay on the CPU, the others take their GPU where there is one."""
    rank, local_rank, world, local_world = launcher_vars()
    on_gpu = rank >= cpu_ranks and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if not on_gpu:
        share_cores(local_world)
    return DistEnv(rank, local_rank, world, local_world, device, "tensorpipe")


def quiet_deepspeed() -> None:
    """DeepSpeed logs every set-up detail at INFO on every rank; keep its warnings only."""
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a c10d function that torch deprecated (harmless; upstream's to update).
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated", category=FutureWarning)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def local_device(choice: str = "auto") -> torch.device:
    """The device of a single-process command: ``auto`` takes CUDA when there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but this host has no CUDA GPU; use device=auto or device=cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")
