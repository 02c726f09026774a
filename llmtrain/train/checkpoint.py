"""The run folder's layout, owned here, and checkpoints through DeepSpeed, complete-or-invisible.

Every module asks ``RunDir`` (and the functions below) for the names and paths of a run: no other module spells
them. Layout of ``<run.dir>``:

    LOCK                        held by the run that uses the folder now (see lock.py)
    config.yaml                 the resolved config of the latest start
    metrics.jsonl               one JSON row per log step / evaluation (rank 0, or parameter server 0)
    wandb_id.txt                the wandb run id, so an auto-resume continues the same wandb run
    PREEMPTED                   left by a run that stopped on a signal with a checkpoint (see preemption.py)
    checkpoints/step_00000100/  one checkpoint: the mode's tensor files (DeepSpeed's files for sync; each
                                server's shard and the consolidated model for async_ps), the resolved
                                ``config.yaml``, llmtrain's own state ``llmtrain_state.json`` (step, tokens,
                                tokenizer fingerprint, model config, data position), a copy of the tokenizer
                                (so a checkpoint stands on its own), and ``COMPLETE.json`` -- written last,
                                atomically, once every file is in place. Auto-resume picks the newest folder that
                                has the marker, so a save killed half-way is never picked up.

A sync run resumed on another number of data-parallel ranks: ZeRO 0 loads directly (nothing is sharded); ZeRO
1/2/3 checkpoints are converted once to DeepSpeed's *universal* format (``deepspeed.checkpoint.ds_to_universal``),
which any world size can load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")
MARKER = "COMPLETE.json"
STATE = "llmtrain_state.json"
CONFIG = "config.yaml"
UNIVERSAL = "universal"


CORRUPT_SUFFIX = ".corrupt"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_folders(root: Path) -> list[Path]:
    """Every ``step_N`` folder below ``root``, complete or not (a folder set aside as corrupt is not one)."""
    return [f for f in root.glob("step_*") if f.is_dir() and not f.name.endswith(CORRUPT_SUFFIX)]


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint below ``root`` (a run's ``checkpoints/``), oldest first: the
    one scan shared by resume (both modes) and by loading for generate/export/eval."""
    found = []
    for folder in checkpoint_folders(root):
        marker = folder / MARKER
        if marker.is_file():
            try:
                found.append((int(json.loads(marker.read_text())["step"]), folder))
            except (ValueError, KeyError):
                log.warning("ignoring %s: unreadable %s", folder, MARKER)
    return sorted(found)


def is_checkpoint_folder(path: Path) -> bool:
    """A checkpoint folder, complete or not (an incomplete one has files but no marker yet)."""
    return path.name.startswith("step_") or (path / MARKER).exists() or (path / STATE).exists()


@dataclass(frozen=True)
class RunDir:
    """One run's folder: every path in it comes from here."""

    path: Path

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The same absolute path on every rank (it comes from the config, never from a clock)."""
        return cls(Path(path).expanduser().resolve())

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def preempted(self) -> Path:
        return self.path / "PREEMPTED"

    @property
    def lock(self) -> Path:
        return self.path / "LOCK"

    def remove_if_unused(self) -> None:
        """Remove the folder when it holds nothing a run produced (only its lock or resolved config): called for
        a folder that a run refused before its first step had made."""
        try:
            if {p.name for p in self.path.iterdir()} <= {self.lock.name, self.config.name}:
                shutil.rmtree(self.path)
        except OSError:  # gone already (another rank), or not ours to remove
            pass

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / tag_of(step)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        return complete_checkpoints(self.checkpoints)

    def newest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        found = self.complete()
        return found[-1][1] if found else None

    def newest_intact(self, is_main: bool, barrier: Callable[[], None] | None = None) -> Path | None:
        """The newest complete checkpoint whose files are all there at their recorded sizes and pass their checksums
        (a truncated file from a full disk or a lost write, flipped bytes, are caught here, before any tensor is
        read). Each damaged newer one is reported in one line and renamed ``step_N.corrupt`` by the main process,
        so the run goes on from the next older one on every process alike. Refused in one line when complete
        checkpoints exist but none is intact.

        With a ``barrier`` (a process group), only the main process reads the files through; the others wait for
        its verdict, which reaches them as the folders it set aside. Without one, every process checks for itself
        (and reaches the same answer)."""
        if barrier is None or is_main:
            found = self._newest_verified(set_aside=is_main, verify_contents=True)
        if barrier is not None:
            barrier()
            if not is_main:
                found = self._newest_verified(set_aside=False, verify_contents=False)
        return found

    def _newest_verified(self, set_aside: bool, verify_contents: bool) -> Path | None:
        complete = self.complete()
        for _, folder in reversed(complete):
            started = time.perf_counter()
            problem = damage(folder, verify_contents)
            if problem is None:
                if verify_contents:
                    log.info("checked %s: every file at its size and checksum (%.1f s)", folder,
                             time.perf_counter() - started)
                return folder
            log.warning("checkpoint %s is damaged (%s): %s", folder, problem,
                        "setting it aside as " + folder.name + CORRUPT_SUFFIX if set_aside else "skipping it")
            if set_aside:
                with contextlib.suppress(OSError):  # another process may have done it already
                    folder.rename(folder.with_name(folder.name + CORRUPT_SUFFIX))
        if complete:
            raise UserError(f"every complete checkpoint in {self.checkpoints} is damaged (set aside as "
                            f"step_*{CORRUPT_SUFFIX}); start a new run.dir, or run.resume=false to start over here")
        return None

    def prune(self, keep: int, current: Path) -> None:
        """Keep the newest ``keep`` complete checkpoints and ``current``; remove every other step folder (older
        ones, and half-written saves of killed runs)."""
        kept = {folder.name for _, folder in self.complete()[-keep:]} | {current.name}
        for folder in checkpoint_folders(self.checkpoints):
            if folder.name not in kept:
                shutil.rmtree(folder, ignore_errors=True)


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
        _fsync(path)
    marker = {**marker, "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker))
    _fsync(tmp)
    os.replace(tmp, folder / MARKER)
    _fsync(folder)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def damage(folder: Path, verify_contents: bool = True) -> str | None:
    """What is wrong with a complete checkpoint's files (None: intact): each file the marker recorded must be there
    at its recorded size and, with ``verify_contents``, every ``.pt`` file must pass the CRC-32 checksums that
    ``torch.save``'s zip format stores for each member -- ``torch.load`` itself never checks them, so flipped
    bytes would load as garbage weights. Markers written before sizes were recorded are trusted."""
    try:
        recorded = read_marker(folder).get("files", {})
    except (OSError, ValueError):
        return f"unreadable {MARKER}"
    for name, size in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, {size:,} were written"
    for name in recorded if verify_contents else ():
        if name.endswith(".pt"):
            problem = _zip_damage(folder / name)
            if problem:
                return f"{name} {problem}"
    return None


def _zip_damage(path: Path) -> str | None:
    """Why a file written by ``torch.save`` fails to read back whole (None: every member matches its CRC-32)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"is not a readable archive ({exc})"
    return f"fails its checksum (member {bad})" if bad else None


def read_marker(folder: Path) -> dict[str, Any]:
    """The completion marker of ``folder``; ``mode`` is "sync" for checkpoints written before it was recorded."""
    return {"mode": "sync", **json.loads((folder / MARKER).read_text())}


def read_state(folder: Path) -> dict[str, Any]:
    """llmtrain's own state in a complete checkpoint (JSON, readable without loading any tensor)."""
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {folder} is corrupt ({STATE}: {exc}); remove it to resume from an "
                        "older one") from None


class Checkpointer:
    """The synchronous mode's checkpoints (collective save and load of a DeepSpeed engine)."""

    def __init__(self, run: RunDir, rank: int, world_size: int, zero_stage: int, keep: int,
                 attachments: dict[str, Path] | None = None) -> None:
        self.run, self.root = run, run.checkpoints
        self.rank, self.world_size, self.zero_stage, self.keep = rank, world_size, zero_stage, keep
        self.attachments = attachments or {}
        """Files copied into every checkpoint by rank 0, by their name there (the tokenizer)."""

    def save(self, engine, step: int, state: dict[str, Any], config_yaml: str) -> Path:
        """Collective: every rank writes its part; rank 0 then writes llmtrain's own state (JSON, readable
        without loading any tensor), marks the folder complete and prunes old ones."""
        folder = self.run.checkpoint(step)
        need = checkpoint_bytes(self.run, sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()))
        problem = ""
        if self.rank == 0:
            if folder.exists():  # a half-written save of the same step from a killed run
                shutil.rmtree(folder)
            problem = no_room(folder, need) or ""
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)  # every rank stops, or none
        if verdict[0]:
            raise UserError(f"{verdict[0]}; the older checkpoints are kept")
        started = time.perf_counter()
        with saving(folder, need):
            engine.save_checkpoint(str(self.root), tag=folder.name, save_latest=False)
            dist.barrier()
            if self.rank == 0:
                marker = {"step": step, "mode": "sync", "world_size": self.world_size,
                          "zero_stage": self.zero_stage}
                finish_checkpoint(folder, config_yaml, state, marker, self.attachments)
        if self.rank == 0:
            size = sum(read_marker(folder)["files"].values())
            log.info("checkpoint of step %d: %.2f GB in %.1f s (%s)", step, size / 2**30, time.perf_counter() - started,
                     folder)
            self.run.prune(self.keep, folder)
        dist.barrier()
        return folder

    def load(self, engine, folder: Path) -> None:
        """Load the weights and optimizer state of ``folder`` into ``engine`` (collective)."""
        saved = read_marker(folder)
        step = int(saved["step"])
        if saved["zero_stage"] != self.zero_stage:
            raise UserError(f"{folder} was saved with dist.zero_stage={saved['zero_stage']}, this run has "
                            f"{self.zero_stage}; resume with the same stage (or start a new run.dir)")
        try:
            if saved["world_size"] == self.world_size or self.zero_stage == 0:
                path, _ = engine.load_checkpoint(str(self.root), tag=folder.name, load_lr_scheduler_states=False)
            else:
                path, _ = self._load_universal(engine, folder, saved)
        except (OSError, RuntimeError, KeyError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"checkpoint {folder} could not be loaded ({first[:200]}); it may be corrupt: "
                            "remove it to resume from an older one") from None
        if path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {folder}; it may be corrupt")
        log.info("resumed from %s (step %d, saved on %d ranks)", folder, step, saved["world_size"])

    def _load_universal(self, engine, folder: Path, saved: dict[str, Any]):
        """ZeRO-sharded checkpoint on a new world size: convert once to the universal format, then load that."""
        universal = folder / UNIVERSAL
        if self.rank == 0 and not (universal / MARKER).is_file():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(universal, ignore_errors=True)
            log.info("converting %s (%s) to DeepSpeed's universal format for a new world size", folder.name,
                     f"{saved['world_size']} -> {self.world_size} ranks")
            with contextlib.redirect_stdout(sys.stderr):  # it prints progress; our stdout is for results
                ds_to_universal(Namespace(input_folder=str(folder), output_folder=str(universal), num_extract_workers=1,
                                          num_merge_workers=1, keep_temp_folder=False, strict=True,
                                          inject_missing_state=True))
            (universal / MARKER).write_text(json.dumps(saved))
        dist.barrier()
        engine._config.load_universal_checkpoint = True  # DeepSpeed reads it from its config at load time
        try:
            return engine.load_checkpoint(str(folder), tag=UNIVERSAL, load_lr_scheduler_states=False)
        finally:
            engine._config.load_universal_checkpoint = False
