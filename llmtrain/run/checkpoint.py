"""One checkpoint procedure for every training mode, and the one rule and path to resume.

A mode supplies a ``CheckpointIO``: how its tensor files are written into a checkpoint folder and read back
(DeepSpeed's engine for the synchronous mode, ``llmtrain.train.checkpoint``; each parameter server's shard for
the asynchronous one, ``llmtrain.ps.checkpoint``). Everything else is done here, the same way for both:

- before a save, room on the disk, checked by the main process and agreed by all (every process stops, or none);
- after the tensors, llmtrain's own files (state, resolved config, tokenizer copy), every file flushed (fsync),
  then the completion marker (``marker_of``: the one schema), written last and atomically;
- saved in the background (train.checkpoint_async), the loop stops only while each process snapshots its state
  (``llmtrain.run.background``: copies in host memory, or live tensors that the loop leaves unchanged until the
  writer has read them, ``before_update``); a background thread writes and flushes it, the processes agree that
  every file is durable, and only then is the marker written (one save in flight, the next waits for it; a kill
  meanwhile leaves the previous checkpoint the newest complete one). A run's last save (its planned end, a stop
  signal, run.stop_at_step) has no steps left to overlap: it is written directly, with no host copy;
- old checkpoints pruned;
- resume: the newest intact complete checkpoint (``RunDir.newest_intact``), the resume rule
  (``check_resumable``) and the mode's layout check, decided by the main process and shared with every process
  (``Checkpoints.verdict``: all go on, or all raise the same refusal), then the load, and one message when it fails;
  or, with run.resume=restart, the folder's earlier history moved aside first;
- the one line that ends a diverged run (``diverged``), naming the checkpoint to go back to, if there is one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmtrain.config import Mode, ModelConfig, Resume, to_plain
from llmtrain.data.tokenizer import check_same_tokenizer
from llmtrain.errors import AgreedError, RunDiverged, UserError, os_reason
from llmtrain.run.background import InFlight
from llmtrain.run.rundir import CONFIG, MARKER, STATE, RunDir, read_marker, read_state

log = logging.getLogger("llmtrain")

RESUMABLE_MODEL_CHANGES = ("name", "dropout", "init_from")
"""Model fields that may change between a checkpoint and its resumption (they change no tensor shape)."""


class CheckpointIO(Protocol):
    """What one mode contributes to a checkpoint: its tensor files."""

    mode: Mode

    def num_params(self) -> int:
        """Parameters of the whole model (the size of a first checkpoint is estimated from it)."""

    def marker_fields(self) -> dict[str, Any]:
        """What the marker records of how the checkpoint was written (world size, ZeRO stage, servers, ...)."""

    def write(self, folder: Path, state: dict[str, Any], settled: bool = False) -> None:
        """Write this mode's tensor files into ``folder`` (called on every process; collective where the mode is)
        before the loop goes on; ``state`` is llmtrain's own state of the checkpoint. ``settled``: nothing changes
        the tensors any more (the run's last save): written directly, with no host copy, and the buffers of earlier
        background saves handed back."""

    def check(self, folder: Path, marker: dict[str, Any]) -> None:
        """Refuse in one ``UserError`` a checkpoint whose layout (its marker given) this run cannot take (called on
        the main process, whose verdict every process shares)."""

    def read(self, folder: Path, marker: dict[str, Any]) -> None:
        """Load this process's tensors from ``folder`` (its marker given, its layout checked). Any error is reported
        as a checkpoint that could not be loaded (a ``UserError`` passes through)."""

    def stage(self, folder: Path, state: dict[str, Any]) -> Callable[[Callable[[], None]], None]:
        """Snapshot this process's tensors for ``folder`` (collective where the mode is: ``HostCopies``) and return
        what writes them there and flushes them to the disk, which runs on a background thread and calls the
        ``release`` it is given once it no longer reads live tensors: the same files as ``write``, byte for byte
        (from a GPU, but for the storages' location tag: host memory)."""


@dataclass(frozen=True)
class Peers:
    """The processes that save and resume together. The main one writes llmtrain's own files and decides; with a
    process group, ``barrier`` waits for all and ``share`` hands the main process's string to every process (the
    parameter-server mode shares over RPC and has no barrier). Alone, both do nothing."""

    is_main: bool = True
    barrier: Callable[[], None] | None = None
    share: Callable[[str], str] = lambda value: value
    agree: Callable[[bool], bool] = lambda ok: ok
    """Whether every process says ``ok``; safe to call from the background writer (in the synchronous mode a
    process group of its own, so that it never meets the loop's collectives)."""

    def wait(self) -> None:
        if self.barrier is not None:
            self.barrier()


def marker_of(step: int, mode: Mode, fields: dict[str, Any]) -> dict[str, Any]:
    """The completion marker's content (``finish_checkpoint`` adds each file's size): the one schema."""
    return {"step": step, "mode": mode.value, **fields}


def client_state(step: int, tokens_seen: int, tokenizer_sha256: str, model_cfg: ModelConfig, seed: int,
                 **extra: Any) -> dict[str, Any]:
    """llmtrain's own state of a checkpoint, the same keys in every mode (``extra``: what one mode adds)."""
    return {"step": step, "tokens_seen": tokens_seen, "tokenizer_sha256": tokenizer_sha256,
            "model": to_plain(model_cfg), "seed": seed, **extra}


class Checkpoints:
    """A run's checkpoints, saved and resumed through one mode's ``CheckpointIO``."""

    def __init__(self, run: RunDir, io: CheckpointIO, peers: Peers, keep: int,
                 attachments: dict[str, Path] | None = None, background: bool = False) -> None:
        self.run, self.io, self.peers, self.keep = run, io, peers, keep
        self.attachments = attachments or {}
        """Files copied into every checkpoint by the main process, by their name there (the tokenizer)."""
        self.background = background
        """Saves in the background (train.checkpoint_async, resolved): the loop stops only to snapshot the state;
        a background thread writes it."""
        self.in_flight = InFlight(report=peers.is_main)
        """The save being written in the background; a loop runs inside ``with checkpoints.in_flight:``, so that
        it ends only once its last save is complete."""

    def save(self, step: int, state: dict[str, Any], config_yaml: str, last: bool = False) -> Path:
        """Every process writes its part; the main one then writes llmtrain's own state, marks the folder complete
        and prunes old ones. A save that cannot finish is one line, with every older checkpoint kept. In the
        background: the previous save is waited for first, and this one is complete once ``in_flight`` is done --
        except the run's ``last`` save, which nothing follows to overlap: written directly."""
        self.in_flight.wait(f"before the save of step {step}")
        folder = self.run.checkpoint(step)
        need = checkpoint_bytes(self.run, self.io.num_params())
        problem = ""
        if self.peers.is_main:
            if folder.exists():  # a half-written save of the same step from a killed run
                shutil.rmtree(folder)
            problem = no_room(folder, need) or ""
        problem = self.peers.share(problem)  # every process stops, or none
        if problem:
            raise UserError(f"{problem}; the older checkpoints are kept")
        started = time.perf_counter()
        if self.background and not last:
            state = json.loads(json.dumps(state))  # llmtrain's own state as of now, whenever it is written
            with saving(folder, need):
                folder.mkdir(parents=True, exist_ok=True)
                flush = self.io.stage(folder, state)
            stopped = time.perf_counter() - started
            self.in_flight.start(lambda release: self._finish_in_background(
                release, folder, flush, step, state, config_yaml, need, started, stopped), f"the save of step {step}")
            return folder
        with saving(folder, need):
            folder.mkdir(parents=True, exist_ok=True)
            self.io.write(folder, state, settled=last)
            self.peers.wait()
            if self.peers.is_main:
                self._complete(folder, step, state, config_yaml)
        if self.peers.is_main:
            direct = "; written directly, as the run's last save" if self.background else ""
            self._report(folder, step, time.perf_counter() - started, how=direct)
        self.peers.wait()
        return folder

    def before_update(self, step: int) -> None:
        """Before the loop's update of ``step`` changes its weights and optimizer state: until the save in flight
        (if any) no longer reads them."""
        self.in_flight.wait_released(f"before the update of step {step}")

    def diverged(self, first: int, last: int, limit: int) -> RunDiverged:
        """``diverged`` once the save in flight (if any) is complete, so that the line names the newest checkpoint
        there is, not the newest one finished so far."""
        self.in_flight.wait("before stopping", raise_error=False)
        return diverged(self.run, first, last, limit)

    def _finish_in_background(self, release: Callable[[], None], folder: Path,
                              flush: Callable[[Callable[[], None]], None], step: int, state: dict[str, Any],
                              config_yaml: str, need: int, started: float, stopped: float) -> None:
        """On the background thread: write and flush this process's files (``release`` called once the live
        tensors are read); once every process has (agreed), the main one writes llmtrain's files and the marker;
        then every process learns whether that worked too."""
        def complete() -> None:
            if self.peers.is_main:
                self._complete(folder, step, state, config_yaml)

        for part in (lambda: flush(release), complete):  # each part done by every process before the next begins
            problem = ""
            try:
                with saving(folder, need):
                    part()
            except UserError as exc:
                problem = str(exc)
            if not self.peers.agree(not problem):
                if self.peers.is_main:
                    shutil.rmtree(folder, ignore_errors=True)
                raise UserError(problem or f"{folder} could not be saved (another process could not write its "
                                "part); the older checkpoints are kept")
        if self.peers.is_main:
            self._report(folder, step, time.perf_counter() - started, f"; the loop stopped {stopped:.2f} s of it")

    def _complete(self, folder: Path, step: int, state: dict[str, Any], config_yaml: str) -> None:
        finish_checkpoint(folder, config_yaml, state, marker_of(step, self.io.mode, self.io.marker_fields()),
                          self.attachments)

    def _report(self, folder: Path, step: int, seconds: float, how: str = "") -> None:
        """The main process, once ``folder`` is complete: one line (``how``: how it was written, when it says more
        than the seconds), then the old checkpoints pruned."""
        size = sum(read_marker(folder)["files"].values())
        log.info("checkpoint of step %d: %.2f GB in %.2f s%s (%s)", step, size / 2**30, seconds, how, folder)
        self.run.prune(self.keep, folder)

    def verdict(self, resume: Resume, tokenizer_sha256: str, model_cfg: ModelConfig) -> Path | None:
        """The checkpoint this run continues from (None: it starts at step 0), decided by the main process and
        shared with every process: every one of them returns the same folder or raises the same ``UserError``, so
        that no process is left waiting at a collective for one that refused. With ``Resume.restart`` the main
        process first moves the folder's earlier history aside."""
        decided = {"folder": None, "refused": None}
        if self.peers.is_main:
            try:
                folder = self._decide(resume, tokenizer_sha256, model_cfg)
                decided["folder"] = str(folder) if folder is not None else None
            except UserError as exc:
                decided["refused"] = str(exc)
        decided = json.loads(self.peers.share(json.dumps(decided)))
        if decided["refused"] is not None:
            raise AgreedError(decided["refused"])
        return Path(decided["folder"]) if decided["folder"] is not None else None

    def _decide(self, resume: Resume, tokenizer_sha256: str, model_cfg: ModelConfig) -> Path | None:
        if resume == Resume.restart:
            start_over(self.run)
            return None
        folder = self.run.newest_intact()
        if folder is not None:
            check_resumable(folder, self.io.mode, tokenizer_sha256, model_cfg)
            self.io.check(folder, read_marker(folder))
        return folder

    def load(self, folder: Path) -> dict[str, Any]:
        """Load this process's tensors from ``folder`` (agreed by ``verdict``); llmtrain's state of it."""
        state, saved = read_state(folder), read_marker(folder)
        try:
            self.io.read(folder, saved)
        except UserError:
            raise
        except (OSError, RuntimeError, KeyError, EOFError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"checkpoint {folder} could not be loaded ({first}); it may be corrupt: remove it to "
                            "resume from an older one") from None
        if self.peers.is_main:
            log.info("resumed from %s (step %d, saved on %s ranks)", folder, state["step"],
                     saved.get("world_size", "?"))
        return state

    def resume(self, resume: Resume, tokenizer_sha256: str, model_cfg: ModelConfig) -> dict[str, Any] | None:
        """``verdict``, then ``load``: the state of the checkpoint this run continues from, or None."""
        folder = self.verdict(resume, tokenizer_sha256, model_cfg)
        return self.load(folder) if folder is not None else None


def start_over(run: RunDir) -> None:
    """run.resume=restart (the main process, before anything of the run is written): move the folder's earlier
    history aside and say where it went, in one line."""
    try:
        aside = run.move_history_aside()
    except OSError as exc:
        raise UserError(f"run.resume=restart could not move the earlier history of {run.path} aside: "
                        f"{os_reason(exc)}") from None
    if aside is None:
        log.info("run.resume=restart: starting at step 0 (%s held no earlier history)", run.path)
    else:
        log.info("run.resume=restart: starting at step 0; the earlier history (%s) was moved to %s",
                 ", ".join(sorted(p.name for p in aside.iterdir())), aside)


def diverged(run: RunDir, first: int, last: int, limit: int) -> RunDiverged:
    """The error that ends a run that skipped ``limit`` steps in a row (``first`` to ``last``) for a non-finite loss
    or gradient, naming the newest complete checkpoint to go back to, or saying that there is none."""
    newest = run.complete()
    if not newest:
        what = (f"no checkpoint was saved in {run.checkpoints}: lower optim.lr or check the data, then re-run "
                "(it starts at step 0)")
    else:
        step, folder = newest[-1]
        when = "before these steps" if step < first else "during these steps, whose updates were skipped"
        what = (f"the newest checkpoint is {folder} (step {step}, saved {when}): lower optim.lr or check the data, "
                "then re-run to continue from it")
    return RunDiverged(f"steps {first}-{last} had a non-finite loss or gradient and were skipped "
                       f"(train.max_nonfinite_steps={limit} in a row): stopping; {what}")


def check_resumable(folder: Path, mode: Mode, tokenizer_sha256: str, model_cfg: ModelConfig) -> dict[str, Any]:
    """The one rule for continuing from ``folder`` in any mode: saved by the same mode, with the same tokenizer
    and the same model shape (only ``RESUMABLE_MODEL_CHANGES`` may differ). Returns the checkpoint's state."""
    saved_mode = read_marker(folder)["mode"]
    if saved_mode != mode.value:
        raise UserError(f"{folder} was saved by mode={saved_mode} and this run has mode={mode.value}; resume it "
                        f"with mode={saved_mode} or start a new run.dir")
    state = read_state(folder)
    check_same_tokenizer(str(state.get("tokenizer_sha256")), tokenizer_sha256, f"checkpoint {folder}", "data.dir",
                         "use the same data.dir or a new run.dir")
    mine = to_plain(model_cfg)
    changed = [f"{k}: {v} -> {mine.get(k)}" for k, v in state["model"].items()
               if k not in RESUMABLE_MODEL_CHANGES and mine.get(k) != v]
    if changed:
        raise UserError(f"{folder} has another model shape ({', '.join(changed)}); use a new run.dir")
    return state


def finish_checkpoint(folder: Path, config_yaml: str, state: dict[str, Any], marker: dict[str, Any],
                      attachments: dict[str, Path] | None = None) -> None:
    """After every tensor file of ``folder`` is written (one process): llmtrain's own files; then every file
    and folder is flushed to the disk (fsync), so that a power loss cannot leave a "complete" checkpoint with
    empty files; then the marker, which records each file's size, written to a temporary name and renamed so
    that it appears whole or not at all."""
    (folder / CONFIG).write_text(config_yaml)
    (folder / STATE).write_text(json.dumps(state, indent=1))
    for name, source in (attachments or {}).items():
        shutil.copyfile(source, folder / name)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in [*files, *sorted({p.parent for p in files}, reverse=True), folder]:
        fsync_path(path)
    marker = {**marker, "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker))
    fsync_path(tmp)
    os.replace(tmp, folder / MARKER)
    fsync_path(folder)


def checkpoint_bytes(run: RunDir, num_params: int) -> int:
    """What the next checkpoint will take on disk: the newest complete one's size, or before the first one,
    16 bytes per parameter (fp32 weights, an fp32 master copy and Adam's two moments)."""
    newest = run.newest()
    recorded = read_marker(newest).get("files") if newest is not None else None
    if recorded:  # the sizes its marker recorded: no walk over the folder
        return sum(recorded.values())
    if newest is not None:  # a checkpoint from before sizes were recorded
        return sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    return 16 * num_params


def no_room(folder: Path, need: int) -> str | None:
    """Why ``need`` bytes will not fit where ``folder`` is saved, or None (checked before a save starts)."""
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else folder.parent.parent).free
    if free >= need:
        return None
    return f"no space left on device: {folder} needs ~{need / 2**20:,.0f} MB, {free / 2**20:,.0f} MB are free"


@contextlib.contextmanager
def saving(folder: Path, need: int) -> Iterator[None]:
    """Turn a save that cannot finish (no space, quota, I/O error) into one line naming the folder and the
    cause; the partial folder is removed, every older checkpoint kept."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError from its writer
        shutil.rmtree(folder, ignore_errors=True)
        cause = no_room(folder, need) or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if cause.startswith("no space"):
            raise UserError(f"{cause}; the older checkpoints are kept") from None
        raise UserError(f"{folder} could not be saved ({cause}); the older checkpoints are kept") from None


def fsync_path(path: Path | str) -> None:
    """Flush ``path`` (a file or a folder) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


