"""The run folder's layout, owned here: every path of a run, and which of its checkpoints are complete and intact.

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

Writing a checkpoint is ``llmtrain.run.checkpoint``'s procedure; each mode supplies only its tensor files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")
MARKER = "COMPLETE.json"
STATE = "llmtrain_state.json"
CONFIG = "config.yaml"


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

    @classmethod
    def holding(cls, checkpoint: Path) -> RunDir:
        """The run folder a checkpoint folder (``<run>/checkpoints/step_N``) belongs to."""
        return cls(checkpoint.parent.parent)

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


