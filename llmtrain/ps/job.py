"""The run folder's record of a running parameter-server job over gRPC, for the workers that join it (ps.join=true).

Server 0 writes ``servers.json`` once the job's servers answer: where they answer, the job's layout, and the settings
a worker must share with the job to join it (``job_settings``). A joiner compares its own with them before it asks
for a worker id, so a worker of another model, budget or precision is refused in one line and the job is never
told of it. The job's secret (``ps.secret``, owner-only) is made by process 0 at each start; every call carries it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtrain.config import TrainConfig
from llmtrain.data.mixture import MixedData, TrainingData
from llmtrain.errors import AgreedError, UserError
from llmtrain.run.checkpoint import RESUMABLE_MODEL_CHANGES

SECRET_ENV = "LLMTRAIN_PS_SECRET"

JOB_SETTINGS = {
    "model": None,  # every field but RESUMABLE_MODEL_CHANGES: the shapes pulls and pushes carry
    "optim": None,  # the servers apply them; a worker clips with optim.grad_clip
    "train": ("max_steps", "global_batch_size", "seed", "subset_tokens"),  # the budget and the data order
    "ps": None,  # the algorithm and the transport; but for what each process may set for itself (below)
}
"""The sections (None: every field) of the resolved config a worker must share with the job it joins. What may
differ follows the resume rule: timeouts, logging, the micro-batch size, a simulated slow rank, dropout."""
OWN_SETTINGS = {"model": RESUMABLE_MODEL_CHANGES, "ps": ("timeout_s", "join", "tls_dir")}


def job_settings(resolved: dict[str, Any], data: TrainingData) -> dict[str, Any]:
    """What a joiner must share with the job, by dotted name: ``JOB_SETTINGS`` of the resolved config, the
    precision and mode, and the data it reads (its tokenizer and each source's training tokens and weight)."""
    settings: dict[str, Any] = {"mode": resolved["mode"], "precision": resolved["precision"]}
    for section, keys in JOB_SETTINGS.items():
        own = OWN_SETTINGS.get(section, ())
        for key, value in resolved[section].items():
            if (keys is None or key in keys) and key not in own:
                settings[f"{section}.{key}"] = value
    sources = data.sources if isinstance(data, MixedData) else [data]
    weights = data.weights if isinstance(data, MixedData) else [1.0]
    settings["data.tokenizer_sha256"] = data.tokenizer_fingerprint
    settings["data.train_tokens"] = [int(s.meta["splits"]["train"]["tokens"]) for s in sources]
    settings["data.weights"] = [round(w, 12) for w in weights]
    return settings


def check_workers(cfg: TrainConfig, num_servers: int, num_workers: int, world: int) -> None:
    """Refuse, in one line, a launch of ``world`` processes that leaves no worker beside ``num_servers`` servers, or
    whose global batch does not split among ``num_workers`` workers' micro-batches (at start-up and ``--check``)."""
    if num_workers < 1:
        raise AgreedError(f"mode=async_ps with ps.num_servers={num_servers} needs at least {num_servers + 1} "
                          f"processes; the launcher started {world}")
    if cfg.train.global_batch_size % (num_workers * cfg.train.micro_batch_size):
        raise AgreedError(f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
                          f"{num_workers} workers x train.micro_batch_size={cfg.train.micro_batch_size}")


def check_joinable(layout: dict[str, Any], mine: dict[str, Any], folder: Path) -> None:
    """Refuse, in one line naming the first setting that differs, to join a job with other ``job_settings``."""
    theirs = layout.get("settings")
    if theirs is None:
        raise UserError(f"ps.join=true: the job in {folder} records no settings to check this worker against "
                        "(started by an older llmtrain); restart the job")
    mine = json.loads(json.dumps(mine))  # as the job's were read: tuples as lists
    for key in [*theirs, *(k for k in mine if k not in theirs)]:
        if theirs.get(key) != mine.get(key):
            raise UserError(f"ps.join=true: this worker has {key}={mine.get(key)} and the job in {folder} runs "
                            f"{key}={theirs.get(key)}; join with the job's config")


def write_layout(path: Path, addresses: list[str], num_servers: int, num_workers: int,
                 settings: dict[str, Any]) -> None:
    """Server 0 of a gRPC job: where its servers answer and what a joiner must share with it (written whole, by
    rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"servers": addresses, "num_servers": num_servers, "num_workers": num_workers,
                               "settings": settings}))
    os.replace(tmp, path)


def read_layout(path: Path, timeout_s: float, finished: Callable[[], int | None] = lambda: None) -> dict[str, Any]:
    """A joining worker: the running job's layout, waiting up to ``timeout_s`` for its servers to start; refused at
    once when the job has finished already (``finished``: the step its budget ended at, or None)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        step = finished()
        if step is not None:
            raise UserError(f"ps.join=true: the job in {path.parent} has finished (its checkpoint of step {step} "
                            "ends its budget); there is nothing to join")
        if time.monotonic() > deadline:
            raise UserError(f"ps.join=true found no running job: {path} does not exist after ps.timeout_s="
                            f"{timeout_s:g} s (start the job with ps.transport=grpc and the same run.dir first)")
        time.sleep(0.5)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"ps.join=true could not read {path} ({exc}); is the job running?") from None


def job_secret(path: Path, create: bool) -> str:
    """The job's secret: ``$LLMTRAIN_PS_SECRET`` where it is set; else the run folder's ``ps.secret``, made anew by
    process 0 at each start (``create``; readable by its owner only), where a worker that joins reads it (the
    launched processes take it from process 0 in the rendezvous)."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    if create:
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.replace(tmp, path)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UserError(f"ps.transport=grpc: the job's secret {path} could not be read ({exc.strerror}); run every "
                        f"process of the job as the same user, or give it in ${SECRET_ENV}") from None
