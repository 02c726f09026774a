"""Checkpoints through DeepSpeed, made complete-or-invisible, with the client state to continue exactly.

Layout: ``<run.dir>/checkpoints/step_00000100/`` holds DeepSpeed's files (one per rank and ZeRO shard), the
resolved ``config.yaml``, a copy of the tokenizer (so a checkpoint is self-contained for generation and export),
and ``COMPLETE.json`` -- written by rank 0 only after every rank has saved. Auto-
resume picks the newest folder that has the marker, so a save killed half-way is never picked up.

A run resumed on another number of data-parallel ranks: ZeRO 0 loads directly (nothing is sharded); ZeRO 1/2/3
checkpoints are converted once to DeepSpeed's *universal* format (``deepspeed.checkpoint.ds_to_universal``),
which any world size can load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")
MARKER = "COMPLETE.json"
STATE = "llmtrain_state.json"
UNIVERSAL = "universal"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint below ``root`` (a run's ``checkpoints/``), oldest first: the
    one scan shared by resume (both modes) and by loading for generate/export/eval."""
    found = []
    for folder in root.glob("step_*"):
        marker = folder / MARKER
        if marker.is_file():
            try:
                found.append((int(json.loads(marker.read_text())["step"]), folder))
            except (ValueError, KeyError):
                log.warning("ignoring %s: unreadable %s", folder, MARKER)
    return sorted(found)


class Checkpointer:
    def __init__(self, run_dir: Path, rank: int, world_size: int, zero_stage: int, keep: int,
                 attachments: dict[str, Path] | None = None) -> None:
        self.root = run_dir / "checkpoints"
        self.rank, self.world_size, self.zero_stage, self.keep = rank, world_size, zero_stage, keep
        self.attachments = attachments or {}
        """Files copied into every checkpoint by rank 0, by their name there (the tokenizer)."""

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        return complete_checkpoints(self.root)

    def save(self, engine, step: int, state: dict[str, Any], config_yaml: str) -> Path:
        """Collective: every rank writes its part; rank 0 then writes llmtrain's own state (JSON, readable
        without loading any tensor), marks the folder complete and prunes old ones."""
        tag = tag_of(step)
        folder = self.root / tag
        if self.rank == 0 and folder.exists():  # a half-written save of the same step from a killed run
            shutil.rmtree(folder)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            (folder / "config.yaml").write_text(config_yaml)
            (folder / STATE).write_text(json.dumps(state, indent=1))
            for name, source in self.attachments.items():
                shutil.copyfile(source, folder / name)
            meta = {"step": step, "world_size": self.world_size, "zero_stage": self.zero_stage}
            tmp = folder / (MARKER + ".tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, folder / MARKER)
            self._prune(keep_tag=tag)
        dist.barrier()
        return folder

    def _prune(self, keep_tag: str) -> None:
        keep = {folder.name for _, folder in self.complete()[-self.keep:]} | {keep_tag}
        for folder in self.root.glob("step_*"):
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def latest_state(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint and llmtrain's state in it (step, reader, tokenizer, model), unloaded."""
        found = self.complete()
        if not found:
            return None
        folder = found[-1][1]
        try:
            return folder, json.loads((folder / STATE).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"checkpoint {folder} is corrupt ({STATE}: {exc}); remove it to resume from an "
                            "older one") from None

    def load(self, engine, folder: Path) -> None:
        """Load the weights and optimizer state of ``folder`` into ``engine`` (collective)."""
        saved = json.loads((folder / MARKER).read_text())
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
