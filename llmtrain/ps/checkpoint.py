"""The parameter-server mode's tensor files (``llmtrain.run.checkpoint`` does the rest of every checkpoint).

A checkpoint holds each server's shard state (``ps<i>.pt``: fp32 masters, optimizer state, counters; what resumes
the run) and the whole model in the consolidated format (``llmtrain.run.trained``), so llmtrain-generate, -export
and -eval read it like any other. Server 0 writes it: every server first copies its shard state in one piece (the
updates wait only for that copy), then writes the copy, when server 0 asks it to by RPC, from server 0's
background writer where the checkpoint is saved in the background.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import Mode, ModelConfig
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError
from llmtrain.ps import rpc as calls
from llmtrain.run.trained import TrainedModel, save_consolidated


def shard_file(folder: Path, server: int) -> Path:
    """Where server ``server`` keeps its shard state in a checkpoint folder."""
    return folder / f"ps{server}.pt"


class ServerCheckpointIO:
    """Every server's shard, and the whole model gathered from them."""

    mode = Mode.async_ps

    def __init__(self, rank: int, world_size: int, num_servers: int, num_workers: int, num_params: int,
                 call_sync: Callable[..., Any], gather: Callable[[], dict[str, torch.Tensor]], model_cfg: ModelConfig,
                 tokenizer: Callable[[], Tokenizer]) -> None:
        self.rank, self.world_size, self.num_servers, self.num_workers = rank, world_size, num_servers, num_workers
        self._num_params, self._on, self.gather = num_params, call_sync, gather
        self.model_cfg, self.tokenizer = model_cfg, tokenizer

    def num_params(self) -> int:
        return self._num_params

    def marker_fields(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_servers": self.num_servers, "num_workers": self.num_workers,
                "zero_stage": None}

    def write(self, folder: Path, state: dict[str, Any], settled: bool = False) -> None:
        """Settled (the run's last save, every update done): each server writes its shard directly. Otherwise as
        ``stage`` then its writer: the servers go on updating, so each copies its shard at once, and the shards are
        of one moment however long the writes take."""
        if not settled:
            self.stage(folder, state)(lambda: None)
            return
        for i in range(self.num_servers):
            self._on(i, calls.write_shard, str(shard_file(folder, i)))
        save_consolidated(self._trained(folder, state), folder)

    def _trained(self, folder: Path, state: dict[str, Any]) -> TrainedModel:
        """The whole model as it is now, gathered from the servers, for the consolidated files."""
        return TrainedModel(self.model_cfg, self.gather(), self.tokenizer(), folder, state["step"],
                            state["tokens_seen"])

    def stage(self, folder: Path, state: dict[str, Any]) -> Callable[[Callable[[], None]], None]:
        for i in range(self.num_servers):
            self._on(i, calls.stage_shard)
        trained = self._trained(folder, state)

        def flush(release: Callable[[], None]) -> None:
            release()  # nothing is live: every shard was copied
            for i in range(self.num_servers):
                self._on(i, calls.write_staged, str(shard_file(folder, i)))
            save_consolidated(trained, folder)

        return flush

    def check(self, folder: Path, marker: dict[str, Any]) -> None:
        if (marker["num_servers"], marker["num_workers"]) != (self.num_servers, self.num_workers):
            raise UserError(f"{folder} was saved by {marker['num_servers']} server(s) and {marker['num_workers']}"
                            f" worker(s); resume with the same (this run has {self.num_servers} and "
                            f"{self.num_workers}) or start a new run.dir")

    def read(self, folder: Path, marker: dict[str, Any]) -> None:
        saved = torch.load(shard_file(folder, self.rank), map_location="cpu", weights_only=False)
        calls.server().load_state_dict(saved)
