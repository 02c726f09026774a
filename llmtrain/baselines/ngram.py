"""An interpolated Kneser-Ney n-gram language model over token ids: the count-based baseline a GPT must beat.

Interpolated Kneser-Ney with one absolute discount ``D_k`` per order (Chen & Goodman 1998, sec. 3;
Jurafsky & Martin, ch. 3). For an order-``n`` model, a history ``h`` of ``k - 1`` tokens and a token ``w``::

    P_k(w | h) = max(c_k(h, w) - D_k, 0) / c_k(h)  +  D_k * N1+(h .)_k / c_k(h) * P_{k-1}(w | h')

    c_k(h)      = sum_w c_k(h, w)
    N1+(h .)_k  = |{w : c_k(h, w) > 0}|
    h'          = h without its first token
    P_0(w)      = 1 / vocab_size

- The highest order ``n`` counts raw occurrences ``c_n(h, w)``. Every lower order ``k < n`` counts
  continuations ``c_k(h, w) = N1+(. h w)``: the number of distinct tokens seen immediately before the
  k-gram ``(h, w)``. So a k-gram that only ever starts a sequence has continuation count 0.
- A history never seen at order ``k`` (``c_k(h) = 0``) backs off entirely: ``P_k(w | h) = P_{k-1}(w | h')``.
- The base case ``P_1`` interpolates with the uniform ``P_0``, so a token never seen gets probability > 0.
- ``D_k = n1 / (n1 + 2 * n2)`` (Ney et al. 1994), where ``n1``, ``n2`` are how many k-grams have count 1 and 2
  in the counts used at order ``k``, clipped into ``[MIN_DISCOUNT, MAX_DISCOUNT]``; or one fixed ``D`` for all.

N-grams never cross a sequence boundary, and when scoring a window a position sees only the tokens before it
in its own row. A position whose history is shorter than ``n - 1`` (the start of a row) uses the highest
order its history allows, ``P_{len(h)+1}``, with that order's *continuation* counts: those are the counts the
model has for that order, and they are what a back-off from a longer history would use too.

Each k-gram is one int64 key in base ``vocab_size`` (first token most significant), so counting is
``np.unique`` and lookup is ``np.searchsorted``: no Python loop ever runs over tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_DISCOUNT, MAX_DISCOUNT = 0.01, 0.99
"""Bounds of an estimated discount: D = 0 would give unseen tokens probability 0, D = 1 discards singletons."""


@dataclass
class _OrderTable:
    """The counts of one order ``k``: sorted k-gram keys and, per history (key // vocab_size), its totals."""

    vocab_size: int
    keys: np.ndarray  # (G,) int64, sorted; only k-grams with count > 0
    counts: np.ndarray  # (G,) int64: raw counts at the top order, continuation counts below
    context_keys: np.ndarray  # (H,) int64, sorted distinct histories
    context_totals: np.ndarray  # (H,) int64: c_k(h)
    context_types: np.ndarray  # (H,) int64: N1+(h .)_k
    discount: float

    @classmethod
    def build(cls, keys: np.ndarray, counts: np.ndarray, vocab_size: int, discount: float | None) -> _OrderTable:
        # keys are sorted, so their histories key // vocab_size are sorted too and each forms one run
        context_keys, starts, types = np.unique(keys // vocab_size, return_index=True, return_counts=True)
        totals = np.add.reduceat(counts, starts) if len(keys) else np.zeros(0, dtype=np.int64)
        if discount is None:
            discount = _estimate_discount(counts)
        return cls(vocab_size, keys, counts, context_keys, totals, types.astype(np.int64), discount)

    def interpolation(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` with ``P_k = a + b * P_{k-1}`` for each k-gram key; ``(0, 1)`` where the history is unseen."""
        seen, i = _lookup(self.context_keys, keys // self.vocab_size)
        found, j = _lookup(self.keys, keys)
        total = np.where(seen, self.context_totals[i], 1)  # the 1 only avoids 0/0 where the history is unseen
        count = np.where(found, self.counts[j], 0)
        a = np.where(seen, np.maximum(count - self.discount, 0.0) / total, 0.0)
        b = np.where(seen, self.discount * self.context_types[i] / total, 1.0)
        return a, b


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each query is in ``sorted_keys`` and a valid index into it (meaningful only where found)."""
    if len(sorted_keys) == 0:
        return np.zeros(queries.shape, dtype=bool), np.zeros(queries.shape, dtype=np.int64)
    index = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return sorted_keys[index] == queries, index


def _estimate_discount(counts: np.ndarray) -> float:
    """Ney et al.'s ``n1 / (n1 + 2 n2)`` from the count-of-counts, clipped into ``[MIN_DISCOUNT, MAX_DISCOUNT]``."""
    n1, n2 = int(np.count_nonzero(counts == 1)), int(np.count_nonzero(counts == 2))
    estimate = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else MAX_DISCOUNT  # no singletons or doubletons: barely any data
    return float(np.clip(estimate, MIN_DISCOUNT, MAX_DISCOUNT))


def _kgram_keys(tokens: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """Keys of the k-grams of the last axis of ``tokens``: ``(..., L)`` -> ``(..., L - k + 1)`` int64."""
    length = max(tokens.shape[-1] - k + 1, 0)
    keys = np.zeros((*tokens.shape[:-1], length), dtype=np.int64)
    if length == 0:  # a sequence shorter than k has no k-gram (and a negative slice end would wrap around)
        return keys
    for j in range(k):  # a loop over the k positions of the gram, not over tokens
        keys = keys * vocab_size + tokens[..., j: j + length]
    return keys


class KneserNeyLM:
    """Interpolated Kneser-Ney language model of a fixed ``order`` over token ids in ``[0, vocab_size)``."""

    def __init__(self, order: int, vocab_size: int, discount: float | None = None) -> None:
        if order < 1:
            raise ValueError(f"order={order} must be >= 1")
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        if vocab_size ** order >= 2 ** 63:
            raise ValueError(f"vocab_size**order = {vocab_size}**{order} does not fit the int64 n-gram keys")
        if discount is not None and not 0.0 < discount < 1.0:
            raise ValueError(f"discount={discount} must be in (0, 1)")
        self.order, self.vocab_size, self.fixed_discount = order, vocab_size, discount
        self._tables: list[_OrderTable] = []  # index k - 1 holds order k

    def _check_tokens(self, tokens: np.ndarray, what: str) -> np.ndarray:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{what} must hold integer token ids, not {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{what} holds token ids outside [0, {self.vocab_size})")
        return tokens.astype(np.int64, copy=False)

    def fit(self, sequences: Iterable[np.ndarray]) -> KneserNeyLM:
        """Count the n-grams of each 1-D sequence (none crosses from one sequence into the next)."""
        # Raw k-grams are needed for k = 2..n only (k = 1 when n = 1): the top order keeps their counts and
        # each lower order k takes its continuation counts from the distinct (k+1)-grams.
        lowest = 1 if self.order == 1 else 2
        grams: dict[int, list[np.ndarray]] = {k: [] for k in range(lowest, self.order + 1)}
        for sequence in sequences:
            tokens = self._check_tokens(np.asarray(sequence), "a sequence")
            if tokens.ndim != 1:
                raise ValueError(f"each sequence must be 1-D, got shape {tokens.shape}")
            for k in grams:
                grams[k].append(_kgram_keys(tokens, k, self.vocab_size))

        def distinct(k: int) -> tuple[np.ndarray, np.ndarray]:
            return np.unique(np.concatenate(grams.pop(k) or [np.zeros(0, np.int64)]), return_counts=True)

        keys, counts = distinct(self.order)
        tables = [_OrderTable.build(keys, counts, self.vocab_size, self.fixed_discount)]
        for k in range(self.order - 1, 0, -1):
            # N1+(. h w): each distinct (k+1)-gram (v, h, w) adds one distinct predecessor v to (h, w)
            keys, counts = np.unique(keys % self.vocab_size ** k, return_counts=True)
            tables.append(_OrderTable.build(keys, counts, self.vocab_size, self.fixed_discount))
            if k > 1:
                keys, _ = distinct(k)
        self._tables = tables[::-1]
        return self

    def _require_fitted(self) -> None:
        if not self._tables:
            raise RuntimeError("call fit() before scoring")

    def log_probs(self, windows: np.ndarray) -> np.ndarray:
        """Natural-log probability of each target ``windows[:, 1:]`` given its row's preceding tokens: (B, T)."""
        self._require_fitted()
        tokens = self._check_tokens(np.asarray(windows), "windows")
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"windows must have shape (B, T+1) with T >= 0, got {tokens.shape}")
        num_targets = tokens.shape[1] - 1
        probs = np.full((tokens.shape[0], num_targets), 1.0 / self.vocab_size)  # P_0, uniform
        for k, table in enumerate(self._tables, start=1):
            # the k-gram ending at target t+1 starts at t+2-k, so targets t >= k-2 have a long enough history;
            # the others keep the lower order they reached (the short-history rule in the module docstring)
            first = max(k - 2, 0)
            if first >= num_targets:
                break
            keys = _kgram_keys(tokens[:, first + 2 - k:], k, self.vocab_size)  # (B, T - first)
            a, b = table.interpolation(keys)
            probs[:, first:] = a + b * probs[:, first:]
        return np.log(probs)

    def prob(self, history: Sequence[int], token: int) -> float:
        """``P(token | history)`` from the last ``order - 1`` tokens of ``history``, one scalar at a time."""
        self._require_fitted()
        context = list(history)[max(len(history) - (self.order - 1), 0):]
        gram = self._check_tokens(np.array([*context, token]), "history and token")
        prob = 1.0 / self.vocab_size
        for k in range(1, len(gram) + 1):
            a, b = self._tables[k - 1].interpolation(_kgram_keys(gram[-k:], k, self.vocab_size))
            prob = float(a[0] + b[0] * prob)
        return prob

    def perplexity(self, windows: np.ndarray) -> float:
        """``exp(-mean log prob)`` over every target of ``windows`` (B, T+1)."""
        return float(np.exp(-self.log_probs(windows).mean()))

    @property
    def discounts(self) -> dict[int, float]:
        """The discount ``D_k`` used at each order ``k``."""
        self._require_fitted()
        return {k: table.discount for k, table in enumerate(self._tables, start=1)}

    @property
    def num_ngrams(self) -> dict[int, int]:
        """Distinct k-grams stored (count > 0) at each order ``k``."""
        self._require_fitted()
        return {k: len(table.keys) for k, table in enumerate(self._tables, start=1)}
