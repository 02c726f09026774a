"""The synchronous mode's tensor files: a DeepSpeed engine's collective save and load (``llmtrain.run.checkpoint``
does the rest of every checkpoint).

A run resumed on another number of ranks or another layout (dist.tensor_parallel, dist.sequence_parallel): ZeRO 0
without tensor parallel loads directly (nothing is sharded); ZeRO 1/2/3 checkpoints are converted once to
DeepSpeed's *universal* format (``deepspeed.checkpoint.ds_to_universal``, which also joins tensor-parallel
slices), which any world size and layout can load. A ZeRO-0 tensor-parallel checkpoint has no such conversion:
it resumes in its own tensor-parallel degree.

A background save (train.checkpoint_async) goes through DeepSpeed's extension point for checkpoint writers:
``StagingCheckpointEngine`` wraps the engine's writer and keeps what the engine hands it; the files are then
snapshotted (``HostCopies``): the largest that fit in train.checkpoint_buffer_gb copied to host memory, the rest live.
On the background thread each snapshot goes to the wrapped writer (the same ``torch.save`` call a synchronous save
makes), the live ones first; once they are written (the files' flush to the disk comes later) the loop may update
the weights again (``Checkpoints.before_update``).
DeepSpeed's background writers do not serve here: the decoupled one hands ZeRO's optimizer state to a spawned
process through a queue that refuses its non-leaf tensors, the fast one pins memory (CUDA only), and neither
flushes files to the disk before its own ``latest`` file is written.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmtrain import workarounds
from llmtrain.config import Mode, ModelConfig
from llmtrain.distributed.deepspeed import CONVERTED, UNIVERSAL, universal_checkpoint
from llmtrain.distributed.memory import choose_copies
from llmtrain.distributed.parallel import Topology
from llmtrain.errors import UserError
from llmtrain.run.background import HostCopies, storage_bytes
from llmtrain.run.checkpoint import Peers, fsync_path

log = logging.getLogger("llmtrain")


def process_group_peers(rank: int, background: bool = False) -> Peers:
    """The ranks of the default process group as checkpoint peers: rank 0 decides, a broadcast tells the rest.
    With ``background`` (every rank alike), the background writers agree over a gloo group of their own."""

    def share(value: str) -> str:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    group = dist.new_group(backend="gloo") if background else None

    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    return Peers(is_main=rank == 0, barrier=dist.barrier, share=share, agree=agree)


class StagingCheckpointEngine:
    """A DeepSpeed engine's checkpoint writer (``engine.checkpoint_engine``, whose every other method it passes
    on), which while ``staged`` is a list keeps each state it is handed with its path, instead of writing it;
    ``snapshot`` then makes them the files of a background save."""

    def __init__(self, writer, buffer_bytes: float | None) -> None:
        self.writer = writer
        self.buffer_bytes = buffer_bytes
        """At most this many bytes of copies (None: every file copied)."""
        self.copies = HostCopies()
        self.staged: list[tuple[str, Any]] | None = None

    def __getattr__(self, name: str):
        return getattr(self.writer, name)

    def save(self, state_dict, path: str) -> None:
        if self.staged is None:
            self.writer.save(state_dict, path)
        else:
            self.staged.append((path, state_dict))

    def snapshot(self, staged: list[tuple[str, Any]]) -> list[tuple[str, Any, bool]]:
        """Each staged file as (path, snapshot, live): the largest that fit in the buffer copied (into the buffers
        of the previous save where the sizes agree), the rest live; the live ones first, in the order written."""
        chosen = choose_copies([storage_bytes(state) for _, state in staged], self.buffer_bytes)
        self.copies.begin()
        files = [(path, self.copies.copy(state) if copied else self.copies.live(state), not copied)
                 for (path, state), copied in zip(staged, chosen, strict=True)]
        return sorted(files, key=lambda file: not file[2])  # stable: the live ones first

    def write(self, files: list[tuple[str, Any, bool]], release: Callable[[], None]) -> None:
        """Write the snapshots as ``save`` would have (``release`` once the live ones are), then flush them."""
        for path, state, live in files:  # the live ones first
            if not live:
                release()
            self.writer.save(state, path)
        release()
        for path, _, _ in files:
            fsync_path(path)


class DeepSpeedCheckpointIO:
    """A DeepSpeed engine's weights and optimizer state, every rank its own files."""

    mode = Mode.sync

    def __init__(self, engine, topology: Topology, zero_stage: int, background: bool = False,
                 buffer_bytes: float | None = None, model: ModelConfig | None = None) -> None:
        self.engine, self.zero_stage = engine, zero_stage
        self.rank, self.world_size = topology.rank, topology.world_size
        self.layout = {"tensor_parallel": topology.tp, "sequence_parallel": topology.sp,
                       "pipeline_parallel": topology.pp, "expert_parallel": topology.ep}
        self.model = model
        """The model config: a pipeline layout's parameter names follow its layers (``pipeline.model_name``)."""
        self.staging: StagingCheckpointEngine | None = None
        if background:
            self.staging = StagingCheckpointEngine(engine.checkpoint_engine, buffer_bytes)
            engine.checkpoint_engine = self.staging

    def num_params(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())

    def marker_fields(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "zero_stage": self.zero_stage, **self.layout}

    def write(self, folder: Path, state: dict[str, Any], settled: bool = False) -> None:
        if self.staging is not None:  # the loop waits for the write: no host copy, settled or not
            self.staging.copies.clear()
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def stage(self, folder: Path, state: dict[str, Any]) -> Callable[[Callable[[], None]], None]:
        writer = self.staging
        writer.staged = []
        try:
            self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
            files = writer.snapshot(writer.staged)
        finally:
            writer.staged = None
        return lambda release: writer.write(files, release)

    def check(self, folder: Path, marker: dict[str, Any]) -> None:
        if marker["zero_stage"] != self.zero_stage:
            raise UserError(f"{folder} was saved with dist.zero_stage={marker['zero_stage']}, this run has "
                            f"{self.zero_stage}; resume with the same stage (or start a new run.dir)")
        saved_ep = marker.get("expert_parallel", 1)
        if max(saved_ep, self.layout["expert_parallel"]) > 1 and (saved_ep, marker["world_size"]) != (
                self.layout["expert_parallel"], self.world_size):
            raise UserError(f"{folder} was saved with dist.expert_parallel={saved_ep} on {marker['world_size']} "
                            f"rank(s); an expert-parallel checkpoint resumes only in its own layout (DeepSpeed's "
                            f"conversions do not join its experts): resume with dist.expert_parallel={saved_ep} on "
                            f"{marker['world_size']} rank(s)")
        for axis in ("tensor_parallel", "pipeline_parallel"):
            saved = marker.get(axis, 1)
            if self.zero_stage == 0 and saved != self.layout[axis]:
                raise UserError(f"{folder} was saved at ZeRO-0 with dist.{axis}={saved}; DeepSpeed converts only "
                                f"ZeRO 1-3 checkpoints between layouts: resume with dist.{axis}={saved}")
        if self.zero_stage == 3 and self._converts(marker) and not workarounds.usable(workarounds.ZERO3_UNIVERSAL_LOAD):
            raise UserError(f"{folder} was saved at ZeRO-3 on {describe_layout(marker)}: this DeepSpeed's universal "
                            "load is not the one llmtrain mends (llmtrain.workarounds.ZERO3_UNIVERSAL_LOAD), so the "
                            "resume would not be known exact; resume on that layout (or check "
                            "tests/integration/zero3_universal_repro.py against this DeepSpeed)")

    def _converts(self, marker: dict[str, Any]) -> bool:
        """Whether the checkpoint of ``marker`` loads through DeepSpeed's universal format (another layout)."""
        same_layout = all(marker.get(axis, 1) == degree for axis, degree in self.layout.items())
        return not (marker["world_size"] == self.world_size and same_layout) and self.zero_stage != 0

    def read(self, folder: Path, marker: dict[str, Any]) -> None:
        if not self._converts(marker):
            path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
        else:
            path, _ = self._load_universal(folder, marker)
        if path is None:
            raise RuntimeError("DeepSpeed found nothing to load")

    def _load_universal(self, folder: Path, saved: dict[str, Any]):
        """A ZeRO-sharded checkpoint on a new world size or layout: convert once to the universal format (rank 0,
        the others wait), then load that."""
        if self.rank == 0:
            now = {"world_size": self.world_size, **self.layout}
            log.info("loading %s (%s) through DeepSpeed's universal format for a new layout (%s)", folder.name,
                     describe_layout(saved), describe_layout(now))
            universal_checkpoint(folder, saved)
        dist.barrier()
        tag = UNIVERSAL  # a pipeline's parameter names are not the whole model's: between the two, renamed
        from_pipeline = saved.get("pipeline_parallel", 1) > 1
        if from_pipeline != (self.layout["pipeline_parallel"] > 1):
            tag = self._renamed(folder / UNIVERSAL, from_pipeline)
        engine = self.engine
        engine._config.load_universal_checkpoint = True  # DeepSpeed reads it from its config at load time
        try:
            loaded = engine.load_checkpoint(str(folder), tag=tag, load_lr_scheduler_states=False)
        finally:
            engine._config.load_universal_checkpoint = False
        if self.zero_stage == 3 and loaded[0] is not None:  # one shared step tensor, the first group's settings
            workarounds.mend_zero3_universal_load(engine.optimizer, str(folder / tag))
        return loaded

    def _renamed(self, universal: Path, from_pipeline: bool) -> str:
        """The universal checkpoint under this layout's parameter names: a pipeline's names follow its layers
        (``tied_modules.embed.wte.weight``, ``2.attn.qkv.weight``), a whole model's are the model's. A folder beside
        it whose files and parameter folders link to the converted ones (made by rank 0, once); its tag."""
        from llmtrain.distributed.pipeline import model_name, pipe_name

        m = self.model
        rename = ((lambda n: model_name(n, m.n_layer)) if from_pipeline else
                  (lambda n: pipe_name(n, m.n_layer, m.tie_embeddings)))
        tag = f"{UNIVERSAL}-{'whole' if from_pipeline else 'pipeline'}"
        target = universal.parent / tag
        if self.rank == 0 and not (target / CONVERTED).is_file():
            shutil.rmtree(target, ignore_errors=True)
            (target / "zero").mkdir(parents=True)
            for path in universal.iterdir():
                if path.is_file() and path.name != CONVERTED:
                    (target / path.name).symlink_to(path)
            # a tied head's folder (DeepSpeed's conversion writes one, without optimizer state) repeats the
            # embedding's: the embedding's first
            for path in sorted((universal / "zero").iterdir(), key=lambda p: (p.name == "lm_head.weight", p.name)):
                link = target / "zero" / (rename(path.name) if path.is_dir() else path.name)
                if not link.exists():
                    link.symlink_to(path)
            (target / CONVERTED).write_text((universal / CONVERTED).read_text())
        dist.barrier()
        return tag


def describe_layout(marker: dict[str, Any]) -> str:
    """A layout in words from a checkpoint's marker fields: "2 rank(s), tensor parallel 2"."""
    parts = [f"{marker['world_size']} rank(s)"]
    parts += [f"{axis.replace('_', ' ')} {marker[axis]}" for axis in ("tensor_parallel", "sequence_parallel",
                                                                       "pipeline_parallel", "expert_parallel")
              if marker.get(axis, 1) > 1]
    return ", ".join(parts)
