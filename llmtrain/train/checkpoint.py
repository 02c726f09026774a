"""The synchronous mode's tensor files: a DeepSpeed engine's collective save and load (``llmtrain.run.checkpoint``
does the rest of every checkpoint).

A run resumed on another number of data-parallel ranks: ZeRO 0 loads directly (nothing is sharded); ZeRO 1/2/3
checkpoints are converted once to DeepSpeed's *universal* format (``deepspeed.checkpoint.ds_to_universal``), which
any world size can load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llmtrain.config import Mode
from llmtrain.errors import UserError
from llmtrain.run.checkpoint import Peers
from llmtrain.run.rundir import MARKER

log = logging.getLogger("llmtrain")
UNIVERSAL = "universal"


def process_group_peers(rank: int) -> Peers:
    """The ranks of the default process group as checkpoint peers: rank 0 decides, a broadcast tells the rest."""

    def share(value: str) -> str:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Peers(is_main=rank == 0, barrier=dist.barrier, share=share)


class DeepSpeedCheckpointIO:
    """A DeepSpeed engine's weights and optimizer state, every rank its own files."""

    mode = Mode.sync

    def __init__(self, engine, rank: int, world_size: int, zero_stage: int) -> None:
        self.engine, self.rank, self.world_size, self.zero_stage = engine, rank, world_size, zero_stage

    def num_params(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())

    def marker_fields(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "zero_stage": self.zero_stage}

    def write(self, folder: Path, state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def check(self, folder: Path, marker: dict[str, Any]) -> None:
        if marker["zero_stage"] != self.zero_stage:
            raise UserError(f"{folder} was saved with dist.zero_stage={marker['zero_stage']}, this run has "
                            f"{self.zero_stage}; resume with the same stage (or start a new run.dir)")

    def read(self, folder: Path, marker: dict[str, Any]) -> None:
        if marker["world_size"] == self.world_size or self.zero_stage == 0:
            path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
        else:
            path, _ = self._load_universal(folder, marker)
        if path is None:
            raise RuntimeError("DeepSpeed found nothing to load")

    def _load_universal(self, folder: Path, saved: dict[str, Any]):
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
        engine = self.engine
        engine._config.load_universal_checkpoint = True  # DeepSpeed reads it from its config at load time
        try:
            return engine.load_checkpoint(str(folder), tag=UNIVERSAL, load_lr_scheduler_states=False)
        finally:
            engine._config.load_universal_checkpoint = False
