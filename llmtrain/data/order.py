"""A keyed permutation of ``[0, n)`` evaluated one index at a time, in O(1) memory.

A balanced Feistel network on the smallest even number of bits that holds ``n - 1`` is a bijection on
``[0, 2**bits)`` for any round function; cycle-walking (apply it again while the result is ``>= n``) restricts
it to a bijection on ``[0, n)`` (Black & Rogaway, "Ciphers with Arbitrary Finite Domains", 2002). Since
``2**bits < 4n``, a walk takes fewer than four steps on average. The round keys come from numpy's
``SeedSequence`` of the key, so the permutation is the same on every machine and numpy version.

Use: ``KeyedPermutation(n, (seed, epoch))(np.arange(i, j))`` -- the positions ``i..j-1`` of the shuffled order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ROUNDS = 6
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finalizer


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """The bijection ``i -> order[i]`` on ``[0, n)`` for one key, without building ``order``."""

    def __init__(self, n: int, key: Sequence[int] | int) -> None:
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self._half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per half: 2 * half >= bits of n - 1
        self._mask = np.uint64((1 << self._half) - 1)
        seed = [key] if isinstance(key, int) else list(key)
        self._keys = np.random.SeedSequence(seed).generate_state(_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self._half), self._mask
        left, right = x >> half, x & mask
        for k in self._keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        """``order[index]`` for an int or an array of ints in ``[0, n)``, as int64."""
        x = np.asarray(index, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"index outside [0, {self.n})")
        y = self._feistel(x.reshape(-1).astype(np.uint64))  # arrays: numpy wraps uint64 products silently
        outside = y >= np.uint64(self.n)
        while outside.any():  # cycle-walk the values that left [0, n) back into it
            y[outside] = self._feistel(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64).reshape(x.shape)


class EpochOrder:
    """Global sample number -> window id, epoch after epoch: epoch ``e`` visits every window once, in the order
    ``KeyedPermutation(num_windows, (seed, e))``. With ``subset`` = K > 0 the epochs cover only the first K windows
    of that full order's epoch 0, in a new order each epoch (``KeyedPermutation(K, (seed, e))`` over them), so the
    subset's first epoch is exactly the full order's first K samples. Memory: O(K), nothing per window.

    Window ids are computed ``BLOCK`` consecutive sample numbers at a time and the last two blocks are kept (64 KB):
    a batch of 8 evaluated alone paid numpy's per-call cost ~50 times over (six Feistel rounds, then cycle-walking
    repeated until its slowest element lands), 27,000 samples/s; a block spreads that over 4,096 samples."""

    BLOCK = 4096

    def __init__(self, num_windows: int, seed: int, subset: int = 0) -> None:
        if not 0 <= subset <= num_windows:
            raise ValueError(f"a subset of {subset} out of {num_windows} windows")
        self.seed, self.total = seed, num_windows
        self._subset = KeyedPermutation(num_windows, (seed, 0))(np.arange(subset)) if subset else None
        self._blocks: dict[int, np.ndarray] = {}  # block number -> window ids of its samples; the last two

    @property
    def num_windows(self) -> int:
        """Windows per epoch: all of them, or the subset."""
        return self.total if self._subset is None else len(self._subset)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """The window id of each global sample number (int64)."""
        samples = np.asarray(samples, dtype=np.int64)
        blocks, offsets = np.divmod(samples, self.BLOCK)
        out = np.empty_like(samples)
        for b in np.unique(blocks):  # a batch spans one block, at most two
            here = blocks == b
            out[here] = self._block(int(b))[offsets[here]]
        return out

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            if len(self._blocks) >= 2:
                del self._blocks[min(self._blocks)]
            self._blocks[b] = self._windows(np.arange(b * self.BLOCK, (b + 1) * self.BLOCK, dtype=np.int64))
        return self._blocks[b]

    def _windows(self, samples: np.ndarray) -> np.ndarray:
        epochs, positions = np.divmod(samples, self.num_windows)
        out = np.empty_like(positions)
        for e in np.unique(epochs):  # a block may span several epochs of a small subset
            here = epochs == e
            shuffled = KeyedPermutation(self.num_windows, (self.seed, int(e)))(positions[here])
            if self._subset is None:
                out[here] = shuffled
            elif e == 0:  # the full order's own first windows, in its order
                out[here] = self._subset[positions[here]]
            else:
                out[here] = self._subset[shuffled]
        return out


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


def keyed_uniform(key: Sequence[int] | int, index: np.ndarray) -> np.ndarray:
    """A float in ``[0, 1)`` per index, fixed by the key and the index alone (not by the other indices asked for):
    element ``index`` of splitmix64's stream seeded from ``SeedSequence(key)``."""
    seed = np.random.SeedSequence([key] if isinstance(key, int) else list(key)).generate_state(1, dtype=np.uint64)[0]
    x = np.asarray(index, dtype=np.int64)
    flat = x.reshape(-1).astype(np.uint64)  # arrays, not scalars: numpy wraps uint64 arithmetic on arrays silently
    bits = _mix(seed + (flat + np.uint64(1)) * _GAMMA)
    return ((bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))).reshape(x.shape)
