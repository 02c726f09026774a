"""The keyed permutation behind the data order: a bijection on [0, n) for any n, well mixed, O(1) memory."""

from __future__ import annotations

import numpy as np
import pytest

from llmtrain.data.order import KeyedPermutation

PRIME_NEAR_1E6 = 999_983
PINNED = [103890, 489346, 336437, 796271, 405067]


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 65537, PRIME_NEAR_1E6])
def test_a_bijection_on_every_domain_checked_exhaustively(n):
    for key in [(0, 0), (1234, 7)]:
        image = KeyedPermutation(n, key)(np.arange(n))
        assert image.dtype == np.int64
        assert np.array_equal(np.sort(image), np.arange(n))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v)).astype(np.float64)  # noqa: E731 -- no ties in a permutation
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


@pytest.mark.parametrize("key", [(1234, 0), (1234, 1), (7, 3)])
def test_well_mixed_at_one_million(key):
    n = 1_000_000
    image = KeyedPermutation(n, key)(np.arange(n))
    assert abs(spearman(np.arange(n), image)) < 0.01
    assert abs(np.corrcoef(image[:-1], image[1:])[0, 1]) < 0.01  # neighbours land far apart
    assert np.mean(image[1:] == image[:-1] + 1) < 1e-4  # runs of consecutive indices are broken up


def test_keys_give_different_orders_and_the_same_key_the_same_one():
    a, b, c = (KeyedPermutation(10_000, key)(np.arange(10_000)) for key in [(1, 0), (1, 1), (1, 0)])
    assert np.array_equal(a, c) and not np.array_equal(a, b)
    assert KeyedPermutation(10_000, 5)(3) == KeyedPermutation(10_000, (5,))(np.array([3]))[0]


def test_values_are_pinned_across_machines():
    """SeedSequence and uint64 arithmetic are platform-independent: these values must never change (a change
    would silently alter every run's data order)."""
    assert KeyedPermutation(1_000_000, (1234, 0))(np.arange(5)).tolist() == PINNED


def test_indices_outside_the_domain_are_refused():
    with pytest.raises(IndexError):
        KeyedPermutation(10, 0)(np.array([10]))
    with pytest.raises(ValueError):
        KeyedPermutation(0, 0)

