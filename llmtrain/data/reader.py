"""What every rank reads: ``(x, y)`` windows of ``block_size`` tokens from the packed shards.

The training stream is defined once for the whole world: a global sample counter walks an epoch-by-epoch
permutation of all windows (``EpochOrder``: a keyed bijection evaluated per sample, so no rank ever holds a
permutation array -- memory does not grow with the corpus). At each step the world takes the next
``world_size * batch_size`` samples and rank ``r`` takes the ``r``-th block of ``batch_size`` of them. So
within an epoch the ranks' windows are disjoint and together cover it, and the state is the counter alone:
a run resumed on another number of ranks continues the exact same global order.

With ``subset_windows=K`` the stream is restricted to a fixed subset: the first K windows of the full stream's
first epoch, repeated epoch after epoch in a new order each time. Its first K samples are exactly those of the
unrestricted run, so an n-gram fitted on a run's first K windows (``llmtrain-ngram train_tokens=...``) has seen
the same training data as a model trained for several epochs on the subset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmtrain.data.order import EpochOrder
from llmtrain.data.shards import (
    META_FILE,
    REPREPARE,
    TOKENIZER_FILE,
    TokenSplit,
    VerifyReport,
    out_of_vocabulary,
    read_meta,
    recorded_max_id,
    verify_shards,
)
from llmtrain.data.tokenizer import Tokenizer, check_same_tokenizer
from llmtrain.errors import UserError


class WindowIndex:
    """Non-overlapping windows of ``block_size + 1`` tokens (inputs plus the shifted target) inside each shard."""

    def __init__(self, split: TokenSplit, block_size: int) -> None:
        if block_size < 1:
            raise UserError(f"block_size={block_size} must be >= 1")
        self.split, self.block_size = split, block_size
        per_shard = [max(0, (len(s) - 1) // block_size) for s in split.shards]
        self._first = np.cumsum([0] + per_shard)  # index of each shard's first window
        self.num_windows = int(self._first[-1])
        if self.num_windows == 0:
            raise UserError(f"the {split.name} split has {split.num_tokens} tokens, fewer than one window of "
                            f"block_size+1 = {block_size + 1}; use a smaller block_size or a larger corpus")

    def gather(self, windows: np.ndarray) -> np.ndarray:
        """Token ids of the given windows as an int64 array of shape (len(windows), block_size + 1); a token id
        outside the vocabulary (a shard changed after it was prepared) is refused here, naming the shard and the
        offset, instead of failing in the embedding. The check is one ``max`` over the batch, small beside
        gathering it."""
        out = np.empty((len(windows), self.block_size + 1), dtype=np.int64)
        shard_of = np.searchsorted(self._first, windows, side="right") - 1
        for row, (w, s) in enumerate(zip(windows, shard_of, strict=True)):
            start = int(w - self._first[s]) * self.block_size
            out[row] = self.split.shards[s][start: start + self.block_size + 1]
        if self.split.vocab_size and out.size and out.max() >= self.split.vocab_size:
            raise self._out_of_vocabulary(windows, shard_of, out)
        return out

    def _out_of_vocabulary(self, windows: np.ndarray, shard_of: np.ndarray, out: np.ndarray) -> UserError:
        row, col = (int(i) for i in np.argwhere(out >= self.split.vocab_size)[0])
        s = int(shard_of[row])
        offset = int(windows[row] - self._first[s]) * self.block_size + col
        return out_of_vocabulary(self.split.files[s], offset, int(out[row, col]), self.split.vocab_size)


def windows_for(tokens: int, block_size: int) -> int:
    """Whole windows that hold ``tokens`` training tokens (rounded up): what ``train.subset_tokens`` keeps and what
    ``llmtrain-ngram train_tokens`` fits on, so the two always mean the same windows."""
    return -(-tokens // block_size)


def to_xy(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (B, T+1) token windows into inputs (B, T) and next-token targets (B, T)."""
    t = torch.from_numpy(tokens)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TokenWindowReader:
    """This rank's share of the shuffled training windows, resumable from ``state_dict()``."""

    def __init__(self, split: TokenSplit, block_size: int, seed: int, rank: int, world_size: int,
                 subset_windows: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.index = WindowIndex(split, block_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.consumed_samples = 0
        """Samples taken by the whole world so far: the reader's entire state."""
        if not 0 <= subset_windows <= self.index.num_windows:
            raise UserError(f"a training subset of {subset_windows} windows of {block_size + 1} tokens is not "
                            f"within the {self.index.num_windows} windows the {split.name} split has")
        self.order = EpochOrder(self.index.num_windows, seed, subset_windows)

    @property
    def num_windows(self) -> int:
        """Windows per epoch: the whole split, or the subset."""
        return self.order.num_windows

    @property
    def epoch(self) -> float:
        return self.consumed_samples / self.num_windows

    def windows_at(self, samples: np.ndarray) -> np.ndarray:
        """Window ids of global sample positions (same answer on every rank)."""
        return self.order(samples)

    def next_windows(self, batch_size: int) -> np.ndarray:
        """Advance the world by one step of ``batch_size`` per rank; the window ids this rank gets."""
        first = self.consumed_samples + self.rank * batch_size
        self.consumed_samples += self.world_size * batch_size
        return self.windows_at(np.arange(first, first + batch_size))

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``batch_size`` windows as (x, y) of shape (batch_size, block_size)."""
        return to_xy(self.index.gather(self.next_windows(batch_size)))

    def batch_at(self, first: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of global sample positions ``[first, first + batch_size)`` as (x, y), whatever this rank's
        share (the async mode's leases name positions)."""
        return to_xy(self.index.gather(self.windows_at(np.arange(first, first + batch_size))))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless single windows: (x, y) each of shape (block_size,)."""
        while True:
            x, y = self.next_batch(1)
            yield x[0], y[0]

    def samples_by_source(self, consumed_samples: int) -> dict[str, int]:
        """Samples taken from each named source of a mix; one data.dir has none to name."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "block_size": self.index.block_size, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "block_size", "num_windows"):
            if state[key] != mine[key]:
                raise UserError(f"the saved data-reader state has {key}={state[key]}, this run has {mine[key]}: "
                                "the dataset or block_size changed since the checkpoint")
        self.consumed_samples = int(state["consumed_samples"])


class ValidationWindows:
    """A fixed set of validation windows, spread evenly over the split; the same for any world size."""

    def __init__(self, split: TokenSplit, block_size: int, max_windows: int = 0) -> None:
        self.index = WindowIndex(split, block_size)
        n = self.index.num_windows
        if max_windows and max_windows < n:
            self.windows = np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))
        else:
            self.windows = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def batches(self, batch_size: int, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share (every ``world_size``-th window) in batches; the union over ranks is the whole set."""
        mine = self.windows[rank::world_size]
        for start in range(0, len(mine), batch_size):
            yield to_xy(self.index.gather(mine[start: start + batch_size]))


@dataclass
class ValidationPart:
    """The validation windows of one source, and its weight in the validation loss (a mix has one per source)."""

    name: str
    """The source's name in metrics (``val_loss/<name>``); empty for a run on one data.dir."""
    weight: float
    """Its share of the weighted total; the weights of a run's parts sum to 1."""
    windows: ValidationWindows


def unigram_counts(split: TokenSplit, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the split."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in split.shards:
        counts += np.bincount(np.asarray(shard), minlength=vocab_size)[:vocab_size]
    return counts


def entropy(p: np.ndarray) -> float:
    """Entropy in nats of a distribution (zeros allowed)."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


class PreparedData:
    """A folder written by ``llmtrain-prepare``: meta, tokenizer and splits."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = read_meta(self.folder)
        if meta is None:
            raise UserError(f"data.dir={self.folder} is not a prepared dataset (no {META_FILE}); "
                            f"run: llmtrain-prepare data.dir={self.folder}")
        self.meta = meta

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta["tokenizer"]["sha256"]

    @property
    def tokenizer_file(self) -> Path:
        return self.folder / self.meta["tokenizer"].get("file", TOKENIZER_FILE)

    def tokenizer(self) -> Tokenizer:
        tokenizer = Tokenizer.load(self.tokenizer_file)
        check_same_tokenizer(tokenizer.fingerprint, self.tokenizer_fingerprint, str(self.tokenizer_file),
                             f"the shards of {self.folder}", "prepare the data again")
        return tokenizer

    def split(self, name: str) -> TokenSplit:
        return TokenSplit.open(self.folder, self.meta, name)

    def check_sizes(self) -> None:
        """Refuse a shard that is missing or not at the size meta.json lists (cheap: no shard is read)."""
        for name in self.meta["splits"]:
            self.split(name)

    def verify(self, show_progress: bool = False) -> list[VerifyReport]:
        """Read every shard and check it against meta.json (sizes, token ids, checksums where recorded), and the
        tokenizer file against its recorded SHA-256; the first problem is raised as a ``UserError``."""
        self.tokenizer()
        return [verify_shards(self.folder, self.meta, show_progress)]

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse a folder whose meta.json records a token id outside a model vocabulary of ``vocab_size``: a
        folder prepared before the largest id was recorded passes (its batches are still checked as read)."""
        largest = recorded_max_id(self.meta)
        if largest is not None and largest[0] >= vocab_size:
            raise UserError(f"{self.folder / META_FILE} records token ids up to {largest[0]} (in {largest[1]}), "
                            f"outside the model's vocabulary of {vocab_size:,}: the folder was changed or prepared "
                            f"with another tokenizer; {REPREPARE}")

    def train_reader(self, block_size: int, seed: int, rank: int, world_size: int,
                     subset_tokens: int = 0) -> TokenWindowReader:
        """This rank's reader; ``subset_tokens`` > 0 restricts training to that many tokens, in whole windows."""
        return TokenWindowReader(self.split("train"), block_size, seed, rank, world_size,
                                 windows_for(subset_tokens, block_size))

    def val_windows(self, block_size: int, max_windows: int = 0) -> ValidationWindows:
        return ValidationWindows(self.split("val"), block_size, max_windows)

    def validation(self, block_size: int, max_windows: int = 0) -> list[ValidationPart]:
        """What a training run scores: the validation windows, as the one part of its validation loss."""
        return [ValidationPart("", 1.0, self.val_windows(block_size, max_windows))]

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the validation tokens' own unigram distribution: the loss to beat."""
        counts = unigram_counts(self.split("val"), self.vocab_size)
        return entropy(counts / counts.sum())

    def __repr__(self) -> str:
        return f"PreparedData({self.folder}, {self.meta['splits']['train']['tokens']} train tokens)"


class TrainReader(Protocol):
    """What ``DeviceBatches`` reads from: a ``TokenWindowReader`` (one data.dir) or a ``mixture.MixtureReader``."""

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``batch_size`` windows as (x, y) of shape (batch_size, block_size)."""
        ...

    def batch_at(self, first: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of global sample positions ``[first, first + batch_size)`` as (x, y)."""
        ...

    def samples_by_source(self, consumed_samples: int) -> dict[str, int]:
        """Samples taken from each named source of a mix as of ``consumed_samples``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The state to save in a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; refuses one saved with other data or block_size."""
        ...


class DeviceBatches:
    """A reader's batches on the compute device, one batch ahead: handing out a batch gathers the next one (on a
    GPU from pinned memory, copied ``non_blocking``), so the host prepares it while the device still runs the
    work queued before. ``state_dict`` is the reader's as of the batches handed out -- the one prepared ahead
    was not trained on, and a resumed run reads it again."""

    def __init__(self, reader: TrainReader, batch_size: int, device: torch.device) -> None:
        self.reader, self.batch_size, self.device = reader, batch_size, device
        self._ahead: tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None = None
        self._state = reader.state_dict()

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        x, y = self.reader.next_batch(self.batch_size)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), self.reader.state_dict()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, self._state = self._ahead or self._fetch()
        self._ahead = self._fetch()
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def samples_by_source(self) -> dict[str, int]:
        """The reader's samples per named source, as of the batches handed out."""
        return self.reader.samples_by_source(self._state["consumed_samples"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state)
        self._ahead, self._state = None, self.reader.state_dict()
