"""The run folder's layout, owned here: every path of a run, and which of its checkpoints are complete and intact.

Every module asks ``RunDir`` (and the functions below) for the names and paths of a run: no other module spells
them. Layout of ``<run.dir>``:

    LOCK                        held by the run that uses the folder now (see lock.py)
    config.yaml                 the resolved config of the latest start
    metrics.jsonl               one JSON row per log step / evaluation (rank 0, or parameter server 0)
    updates.jsonl               async mode: one JSON row per applied update (its worker, version, staleness and
                                units of data; parameter server 0)
    servers.json                async mode over gRPC, while the job runs: where its servers answer and the settings
                                a worker must share to join it (read by a worker that joins, ps.join=true)
    ps.secret                   async mode over gRPC: the job's secret, owner-only, made anew at each start
    wandb_id.txt                the wandb run id, so an auto-resume continues the same wandb run
    PREEMPTED                   left by a run that stopped on a signal with a checkpoint (see preemption.py)
    DAMAGED.json                left when every checkpoint was found damaged: what was found and when; every later
                                run with run.resume=auto is refused until run.resume=restart starts over
    previous/1/, previous/2/    earlier histories, moved aside whole by run.resume=restart (nothing is deleted)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")
MARKER = "COMPLETE.json"
STATE = "llmtrain_state.json"
CONFIG = "config.yaml"
DAMAGED = "DAMAGED.json"
CORRUPT_SUFFIX = ".corrupt"
RESTART_HINT = "run.resume=restart starts over in this folder (its old files moved aside, none deleted), or use a " \
               "new run.dir"


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
    def updates(self) -> Path:
        return self.path / "updates.jsonl"

    @property
    def servers(self) -> Path:
        return self.path / "servers.json"

    @property
    def secret(self) -> Path:
        return self.path / "ps.secret"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def preempted(self) -> Path:
        return self.path / "PREEMPTED"

    @property
    def lock(self) -> Path:
        return self.path / "LOCK"

    @property
    def damaged(self) -> Path:
        return self.path / DAMAGED

    @property
    def previous(self) -> Path:
        return self.path / "previous"

    def history(self) -> list[Path]:
        """What one history of the folder consists of, where it exists: its checkpoints (those set aside as
        corrupt included), its metrics, its resolved config, the damage mark, the stop mark and the wandb run id
        (a new history is a new wandb run)."""
        return [p for p in (self.checkpoints, self.metrics, self.config, self.damaged, self.preempted, self.wandb_id)
                if p.exists()]

    def move_history_aside(self) -> Path | None:
        """Move the folder's history (``history``) into ``previous/<n>/``, n the first unused number, so that a
        new history never mixes with an old one and resume never picks an old checkpoint; nothing is deleted.
        The folder it went to, or None when there was none."""
        found = self.history()
        if not found:
            return None
        self.previous.mkdir(exist_ok=True)
        n = 1 + max((int(p.name) for p in self.previous.iterdir() if p.name.isdigit()), default=0)
        aside = self.previous / str(n)
        aside.mkdir()
        for path in found:
            path.rename(aside / path.name)
        return aside

    def mark_damaged(self, found: dict[str, str]) -> None:
        """Record that every checkpoint is damaged (``found``: each one's folder name, as set aside, and what is
        wrong with it): every later run with run.resume=auto is refused until run.resume=restart."""
        mark = {"found": found, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "what_to_do": RESTART_HINT}
        tmp = self.damaged.with_suffix(".tmp")
        tmp.write_text(json.dumps(mark, indent=1) + "\n")
        tmp.replace(self.damaged)

    def refuse_if_marked(self) -> None:
        """Refuse in one line to continue a folder whose checkpoints were all found damaged (``mark_damaged``)."""
        if not self.damaged.exists():
            return
        try:
            mark = json.loads(self.damaged.read_text())
            when, names = mark["time"], ", ".join(mark["found"])
        except (OSError, ValueError, KeyError, TypeError):
            when, names = "an earlier run", "see the file"
        raise UserError(f"every checkpoint in {self.checkpoints} was found damaged ({names}; {self.damaged} "
                        f"written {when}); {RESTART_HINT}")

    def remove_if_unused(self) -> None:
        """Remove the folder when it holds nothing a run produced (only its lock or resolved config): called for
        a folder that a run made and then failed in before its first checkpoint (or metrics row)."""
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

    def newest_intact(self) -> Path | None:
        """The newest complete checkpoint whose files are all there at their recorded sizes and pass their checksums
        (a truncated file from a full disk or a lost write, flipped bytes, are caught here, before any tensor is
        read). Each damaged newer one is reported in one line and renamed ``step_N.corrupt``, so the run goes on
        from the next older one.

        When checkpoints exist (complete, or set aside) but none is intact, the folder is marked
        (``mark_damaged``) and the run refused in one line; a marked folder is refused from then on. Called by
        the main process only: it decides for every process (``llmtrain.run.checkpoint.Checkpoints.verdict``)."""
        self.refuse_if_marked()
        complete, problems = self.complete(), {}
        for _, folder in reversed(complete):
            started = time.perf_counter()
            problem = damage(folder)
            if problem is None:
                log.info("checked %s: every file at its size and checksum (%.1f s)", folder,
                         time.perf_counter() - started)
                return folder
            log.warning("checkpoint %s is damaged (%s): setting it aside as %s", folder, problem,
                        folder.name + CORRUPT_SUFFIX)
            problems[folder.name + CORRUPT_SUFFIX] = problem
            with contextlib.suppress(OSError):  # renamed already: what counts is that it is out of the way
                folder.rename(folder.with_name(folder.name + CORRUPT_SUFFIX))
        set_aside = sorted(p for p in self.checkpoints.glob("step_*" + CORRUPT_SUFFIX) if p.is_dir())
        if not complete and not set_aside:
            return None
        found = {**{p.name: "set aside by an earlier run" for p in set_aside}, **problems}
        self.mark_damaged(found)
        raise UserError(f"every checkpoint in {self.checkpoints} is damaged ({', '.join(found)}; each kept, "
                        f"recorded in {self.damaged}); {RESTART_HINT}")

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


