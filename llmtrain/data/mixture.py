"""Training on a weighted blend of prepared datasets (``data.mix``), as GPT-NeoX's ``train_data_weights`` and
Megatron's blended datasets do -- with the reader's one-counter state kept.

The global sample stream is cut into periods of ``PERIOD`` samples. In every period source ``k`` gets exactly
``n_k`` samples (the weights' shares of ``PERIOD``, rounded by largest remainder so they sum to ``PERIOD``), at
positions chosen by a keyed permutation of the period's slots (``KeyedPermutation``, keyed by the seed and the
period's number): position ``q`` goes to the source whose range of slots holds its slot. Each source's samples
are numbered in the order they come, and its own stream maps those numbers to windows exactly as a run on that
folder alone would (its own epoch order, from the same seed) -- a mix of one source is that source. So global
sample ``i`` is a pure function of ``i``: the counter is still the whole state, a run resumed on another number
of ranks continues the same global order, and the realized shares differ from the weights by at most one sample
per source and period. Each period's assignment is computed once (``PERIOD`` Feistel evaluations, about a
millisecond) and kept while the stream is in it; nothing is stored per sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.config import MixSource
from llmtrain.data.order import KeyedPermutation
from llmtrain.data.reader import (
    PreparedData,
    TokenWindowReader,
    ValidationPart,
    entropy,
    to_xy,
    unigram_counts,
)
from llmtrain.data.shards import VerifyReport
from llmtrain.data.tokenizer import Tokenizer, check_same_tokenizer
from llmtrain.errors import UserError

PERIOD = 10_000
"""Samples per period of the interleaving: each source's share is exact within every period."""
_MIX_KEY = 0x6D6978  # "mix": keeps the periods' keys apart from any other permutation keyed by the same seed


def quotas(weights: list[float], period: int = PERIOD) -> np.ndarray:
    """Each source's samples per period: ``period * weight / sum(weights)`` rounded by largest remainder."""
    share = np.asarray(weights, dtype=np.float64) / np.sum(weights) * period
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: period - counts.sum()]] += 1
    return counts


class MixtureSchedule:
    """Global sample number -> (source, that source's sample number), without per-sample state."""

    def __init__(self, weights: list[float], seed: int, period: int = PERIOD) -> None:
        self.period, self.seed = period, seed
        self.counts = quotas(weights, period)
        if (self.counts == 0).any():
            k = int(np.flatnonzero(self.counts == 0)[0])
            raise UserError(f"data.mix[{k}].weight={weights[k]} is below 1/{period} of the total weight: it would "
                            "never be sampled")
        self._first_slot = np.concatenate([[0], np.cumsum(self.counts)])
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _period(self, period: int) -> tuple[np.ndarray, np.ndarray]:
        """The source of each position of a period, and the position's number among that source's samples in
        the period. Kept for the last two periods asked for: O(PERIOD) memory, whatever the corpus size."""
        if period not in self._cache:
            slots = KeyedPermutation(self.period, (self.seed, period, _MIX_KEY))(np.arange(self.period))
            source = np.searchsorted(self._first_slot, slots, side="right") - 1
            by_source = np.argsort(source, kind="stable")  # positions grouped by source, in order within each
            within = np.empty(self.period, dtype=np.int64)
            within[by_source] = np.arange(self.period) - self._first_slot[source[by_source]]
            self._cache = {p: v for p, v in self._cache.items() if p == period - 1}
            self._cache[period] = (source, within)
        return self._cache[period]

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The source of each global sample, and its sample number within that source's own stream."""
        periods, positions = np.divmod(np.asarray(samples, dtype=np.int64), self.period)
        source, number = np.empty_like(positions), np.empty_like(positions)
        for p in np.unique(periods):  # a batch spans one period, rarely two
            here = periods == p
            sources, within = self._period(int(p))
            source[here] = sources[positions[here]]
            number[here] = p * self.counts[source[here]] + within[positions[here]]
        return source, number

    def samples_per_source(self, consumed: int) -> np.ndarray:
        """How many of the first ``consumed`` global samples each source gave."""
        period, rest = divmod(consumed, self.period)
        return period * self.counts + np.bincount(self._period(period)[0][:rest], minlength=len(self.counts))


class MixtureReader:
    """This rank's share of the blended training stream; the same interface and one-counter state as
    ``TokenWindowReader``."""

    def __init__(self, names: list[str], streams: list[TokenWindowReader], weights: list[float], seed: int,
                 rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.names, self.streams, self.weights = names, streams, weights
        self.schedule = MixtureSchedule(weights, seed)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.block_size = streams[0].index.block_size
        self.consumed_samples = 0
        """Samples taken by the whole world so far: the reader's entire state."""

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``batch_size`` windows as (x, y) of shape (batch_size, block_size)."""
        first = self.consumed_samples + self.rank * batch_size
        self.consumed_samples += self.world_size * batch_size
        return self.batch_at(first, batch_size)

    def batch_at(self, first: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of global sample positions ``[first, first + batch_size)`` of the blend as (x, y)."""
        source, position = self.schedule.locate(np.arange(first, first + batch_size))
        tokens = np.empty((batch_size, self.block_size + 1), dtype=np.int64)
        for k in np.unique(source):
            rows = source == k
            stream = self.streams[k]
            tokens[rows] = stream.index.gather(stream.windows_at(position[rows]))
        return to_xy(tokens)

    def samples_by_source(self, consumed_samples: int) -> dict[str, int]:
        counts = self.schedule.samples_per_source(consumed_samples)
        return {name: int(n) for name, n in zip(self.names, counts, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "block_size": self.block_size,
                "mix": [{"name": name, "weight": weight, "num_windows": stream.num_windows}
                        for name, weight, stream in zip(self.names, self.weights, self.streams, strict=True)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "block_size", "mix"):
            if state.get(key) != mine[key]:
                raise UserError(f"the saved data-reader state has {key}={state.get(key)}, this run has {mine[key]}: "
                                "the data mix or block_size changed since the checkpoint")
        self.consumed_samples = int(state["consumed_samples"])


class MixedData:
    """Several prepared folders with one tokenizer, blended by weight: what ``PreparedData`` offers a trainer."""

    def __init__(self, mix: list[MixSource]) -> None:
        self.sources = [_open(i, source) for i, source in enumerate(mix)]
        self.names = [source.name or Path(source.dir).name for source in mix]
        total = sum(source.weight for source in mix)
        self.weights = [source.weight / total for source in mix]
        first = self.sources[0]
        for i, data in enumerate(self.sources[1:], 1):
            check_same_tokenizer(data.tokenizer_fingerprint, first.tokenizer_fingerprint,
                                 f"data.mix[{i}].dir={data.folder}", f"data.mix[0].dir={first.folder}",
                                 f"prepare it with data.tokenizer_path={first.tokenizer_file}")
        self.folder = first.folder

    @property
    def vocab_size(self) -> int:
        return self.sources[0].vocab_size

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.sources[0].tokenizer_fingerprint

    @property
    def tokenizer_file(self) -> Path:
        return self.sources[0].tokenizer_file

    def tokenizer(self) -> Tokenizer:
        return self.sources[0].tokenizer()

    def check_sizes(self) -> None:
        """Every source checked as ``PreparedData.check_sizes`` checks one."""
        for data in self.sources:
            data.check_sizes()

    def verify(self, show_progress: bool = False) -> list[VerifyReport]:
        """Every source checked as ``PreparedData.verify`` checks one."""
        return [report for data in self.sources for report in data.verify(show_progress)]

    def check_token_ids(self, vocab_size: int) -> None:
        """Every source checked as ``PreparedData.check_token_ids`` checks one."""
        for data in self.sources:
            data.check_token_ids(vocab_size)

    def train_reader(self, block_size: int, seed: int, rank: int, world_size: int,
                     subset_tokens: int = 0) -> MixtureReader:
        """This rank's reader over the blend (``subset_tokens`` is refused with data.mix by the config)."""
        assert not subset_tokens, "TrainConfig refuses train.subset_tokens with data.mix"
        streams = [data.train_reader(block_size, seed, rank=0, world_size=1) for data in self.sources]
        return MixtureReader(self.names, streams, self.weights, seed, rank, world_size)

    def validation(self, block_size: int, max_windows: int = 0) -> list[ValidationPart]:
        """Each source's validation windows (up to ``max_windows`` each), weighted as in training."""
        return [ValidationPart(name, weight, data.val_windows(block_size, max_windows))
                for name, weight, data in zip(self.names, self.weights, self.sources, strict=True)]

    def unigram_entropy(self) -> float:
        """Entropy of the weighted blend of the sources' validation unigram distributions: the weighted
        validation loss of the best context-free model."""
        blend = sum(weight * counts / counts.sum() for weight, counts in
                    zip(self.weights, (unigram_counts(d.split("val"), d.vocab_size) for d in self.sources),
                        strict=True))
        return entropy(blend)

    def __repr__(self) -> str:
        return "MixedData(" + ", ".join(f"{n}={w:.3g}" for n, w in zip(self.names, self.weights, strict=True)) + ")"


TrainingData = PreparedData | MixedData
"""What a trainer reads: one prepared folder, or a blend of several."""


def _open(i: int, source: MixSource) -> PreparedData:
    try:
        return PreparedData(source.dir)
    except UserError as exc:
        raise UserError(f"data.mix[{i}]: {exc}") from None
