"""One run per run folder: the main process of a run holds ``run.dir/LOCK`` from set-up to exit.

Two runs started on one run.dir would rewrite each other's checkpoints and interleave their metrics. The lock is
a file created exclusively (``O_CREAT | O_EXCL``, atomic on local and NFS file systems alike, where ``flock``
may not be), naming its holder: host, pid, Slurm job id. A second run is refused in one line naming the holder.
A lock whose holder is gone is taken over with a warning: a dead pid on this host, the same Slurm job (an
earlier incarnation of a requeued job), or a Slurm job that is no longer in the queue.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID") or None,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def acquire(path: Path) -> None:
    """Take the lock at ``path`` for this process until it exits, or raise ``UserError`` naming its holder."""
    me = this_process()
    for _ in range(3):  # a takeover races with another process doing the same at most once or twice
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            gone = _gone_because(holder, me)
            if gone is None:
                raise UserError(f"{path.parent} is in use by another run ({describe(holder)}); wait for it to end "
                                f"or stop it, or use another run.dir (if that run is gone, delete {path})") from None
            log.warning("taking over %s: its holder (%s) is gone: %s", path, describe(holder), gone)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release, path, me)
        return
    raise UserError(f"could not take the lock {path}: other runs keep taking it over")


def release(path: Path, me: dict[str, Any]) -> None:
    """Remove the lock if it is still this process's."""
    holder = _read(path)
    if holder is not None and (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
        path.unlink(missing_ok=True)


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "unreadable"
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _gone_because(holder: dict[str, Any] | None, me: dict[str, Any]) -> str | None:
    """Why the lock's holder is known to be gone, or None when it may still run."""
    if holder is None:  # written by no llmtrain run, or cut short: nothing names a live holder
        return "the lock names no holder"
    if holder.get("job_id") and holder.get("job_id") == me["job_id"]:
        return f"it was this Slurm job ({me['job_id']}) before a restart"
    if holder.get("host") == me["host"]:
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return f"no process {holder['pid']} on this host"
        except (PermissionError, KeyError, ValueError, TypeError):
            return None
        return None
    if holder.get("job_id") and shutil.which("squeue"):
        state = subprocess.run(["squeue", "-h", "-j", str(holder["job_id"]), "-o", "%T"], capture_output=True,
                               text=True, timeout=30)
        if state.returncode == 0 and not state.stdout.strip() or "Invalid job id" in state.stderr:
            return f"Slurm job {holder['job_id']} is no longer queued or running"
    return None
