"""The per-rank reader: disjoint ranks that cover each epoch, one global order for any world size, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmtrain.data.reader import DeviceBatches, PreparedData, TokenWindowReader
from llmtrain.errors import UserError

BLOCK = 64


@pytest.fixture(scope="module")
def data(prepared_small) -> PreparedData:
    return PreparedData(prepared_small)


def readers(data: PreparedData, world_size: int, seed: int = 7) -> list[TokenWindowReader]:
    return [data.train_reader(BLOCK, seed, rank, world_size) for rank in range(world_size)]


def test_dataset_spans_several_shards(data):
    split = data.split("train")
    assert len(split.shards) >= 3, "the fixture must exercise windows in more than one shard"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_disjoint_and_cover_the_epoch(data, world_size):
    ranks = readers(data, world_size)
    n = ranks[0].num_windows
    batch = 5
    taken: list[list[int]] = [[] for _ in ranks]
    for _ in range(-(-n // (world_size * batch))):  # enough steps to pass the end of epoch 0
        for r, reader in enumerate(ranks):
            first = reader.consumed_samples + r * batch
            ids = reader.next_windows(batch)
            taken[r] += [w for k, w in enumerate(ids) if first + k < n]  # keep epoch-0 samples only
    flat = [w for t in taken for w in t]
    assert len(flat) == len(set(flat)) == n  # disjoint, and nothing repeated
    assert sorted(flat) == list(range(n))  # together they cover every window
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not set(taken[a]) & set(taken[b])


def test_order_is_deterministic_and_shuffled(data):
    a = readers(data, 1, seed=3)[0].next_windows(50)
    b = readers(data, 1, seed=3)[0].next_windows(50)
    c = readers(data, 1, seed=4)[0].next_windows(50)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.sort(a))


def test_same_global_order_for_any_world_size(data):
    single = readers(data, 1)[0]
    expected = np.concatenate([single.next_windows(12) for _ in range(10)])
    for world_size in (2, 3, 4):
        ranks = readers(data, world_size)
        per_rank = 12 // world_size
        got = np.concatenate([r.next_windows(per_rank) for _ in range(10) for r in ranks])
        assert np.array_equal(got, expected), world_size


def test_epochs_are_permutations_that_differ(data):
    reader = readers(data, 1)[0]
    n = reader.num_windows
    e0 = reader.windows_at(np.arange(0, n))
    e1 = reader.windows_at(np.arange(n, 2 * n))
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert not np.array_equal(e0, e1)


def test_tokens_are_shard_slices_and_targets_shift_by_one(data):
    reader = readers(data, 1)[0]
    x, y = reader.next_batch(8)
    assert x.shape == y.shape == (8, BLOCK)
    assert (x[:, 1:] == y[:, :-1]).all()
    split = data.split("train")
    flat = np.concatenate([np.asarray(s) for s in split.shards])
    ids = reader.windows_at(np.arange(0, 8))
    # window w of shard s starts at s's offset + (w - first window of s) * BLOCK
    firsts = np.cumsum([0] + [(len(s) - 1) // BLOCK for s in split.shards])
    starts = np.cumsum([0] + [len(s) for s in split.shards])
    for row, w in enumerate(ids):
        s = np.searchsorted(firsts, w, side="right") - 1
        start = starts[s] + (w - firsts[s]) * BLOCK
        assert np.array_equal(x[row].numpy(), flat[start:start + BLOCK])
        assert np.array_equal(y[row].numpy(), flat[start + 1:start + BLOCK + 1])


def test_resume_continues_the_same_sequence(data):
    uninterrupted = readers(data, 1)[0]
    expected = [uninterrupted.next_windows(4) for _ in range(12)]
    first = readers(data, 1)[0]
    for _ in range(7):
        first.next_windows(4)
    resumed = readers(data, 1)[0]
    resumed.load_state_dict(first.state_dict())
    got = [resumed.next_windows(4) for _ in range(5)]
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, expected[7:], strict=True))


def test_batches_prepared_ahead_are_not_counted_as_read(data):
    plain = readers(data, 1)[0]
    expected = [plain.next_batch(4) for _ in range(6)]
    batches = DeviceBatches(readers(data, 1)[0], 4, torch.device("cpu"))
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(batches.next(), expected[i], strict=True))
    state = batches.state_dict()  # the reader itself is one batch further: the one prepared ahead
    assert state["consumed_samples"] == 3 * 4 and batches.reader.consumed_samples == 4 * 4
    resumed = DeviceBatches(readers(data, 1)[0], 4, torch.device("cpu"))
    resumed.load_state_dict(state)
    for i in range(3, 6):
        assert all(torch.equal(a, b) for a, b in zip(resumed.next(), expected[i], strict=True))


def test_resume_on_another_world_size(data):
    """2 ranks for 3 steps, then 1 rank at the same global batch: the global sequence is unchanged."""
    expected = readers(data, 1)[0]
    reference = np.concatenate([expected.next_windows(4) for _ in range(6)])
    two = readers(data, 2)
    before = np.concatenate([r.next_windows(2) for _ in range(3) for r in two])
    state = two[0].state_dict()
    assert two[1].state_dict() == state  # every rank holds the same global state
    one = readers(data, 1)[0]
    one.load_state_dict(state)
    after = np.concatenate([one.next_windows(4) for _ in range(3)])
    assert np.array_equal(np.concatenate([before, after]), reference)
    # and back from 1 to 3 ranks
    three = readers(data, 3)
    for r in three:
        r.load_state_dict(one.state_dict())
    more = np.concatenate([r.next_windows(2) for r in three])
    assert np.array_equal(more, expected.next_windows(6))


def test_state_from_another_dataset_is_refused(data):
    state = readers(data, 1)[0].state_dict()
    other = data.train_reader(BLOCK * 2, 7, 0, 1)
    with pytest.raises(UserError, match="block_size"):
        other.load_state_dict(state)


@pytest.mark.parametrize("max_windows", [0, 10])
def test_validation_windows_identical_for_any_world_size(data, max_windows):
    val = data.val_windows(BLOCK, max_windows)
    assert len(val) == (max_windows or val.index.num_windows)

    def all_rows(world_size):
        rows = [x for r in range(world_size) for x, _ in val.batches(3, r, world_size)]
        return sorted(map(tuple, np.concatenate([x.numpy() for x in rows]).tolist()))

    reference = all_rows(1)
    assert len(reference) == len(val)
    for world_size in (2, 3):
        assert all_rows(world_size) == reference


def test_split_shorter_than_one_window_is_refused(data):
    tokens = data.split("val").num_tokens
    with pytest.raises(UserError, match=f"the val split has {tokens} tokens, fewer than one window"):
        data.val_windows(tokens + 10)


def test_subset_is_the_full_runs_first_windows_repeated_in_new_orders(data):
    full = readers(data, 1)[0]
    k = 10
    subset = data.train_reader(BLOCK, 7, 0, 1, subset_tokens=k * BLOCK - 5)  # rounded up to whole windows
    assert subset.num_windows == k
    first = full.next_windows(k)
    epochs = [subset.next_windows(k) for _ in range(3)]
    assert np.array_equal(epochs[0], first)  # the subset's first epoch is the unrestricted run's first windows
    for e in epochs[1:]:
        assert sorted(e) == sorted(first)  # later epochs: the same windows ...
    assert not np.array_equal(epochs[1], epochs[0]) and not np.array_equal(epochs[2], epochs[1])  # ... reshuffled
    # Two ranks take the same global stream, and the state is refused on a reader without the subset.
    ranks = [data.train_reader(BLOCK, 7, r, 2, subset_tokens=k * BLOCK) for r in range(2)]
    two = np.concatenate([r.next_windows(5) for _ in range(3) for r in ranks])
    assert np.array_equal(two, np.concatenate(epochs))
    with pytest.raises(UserError, match="num_windows"):
        full.load_state_dict(ranks[0].state_dict())


def test_subset_larger_than_the_split_is_refused(data):
    n = data.split("train").num_tokens
    with pytest.raises(UserError, match="subset of .* is not within the"):
        data.train_reader(BLOCK, 7, 0, 1, subset_tokens=n + BLOCK)


def _rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory of a kind from /proc/self/status (VmRSS: all; RssAnon: not file-backed)."""
    for line in open("/proc/self/status"):
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {kind} in /proc/self/status")


def test_a_reader_over_1e12_windows_is_o1_in_memory(tmp_path):
    """10^12 windows (a 2 TB sparse shard, block_size 1): built and 10^4 samples served in < 1 s, < 20 MB more."""
    import time

    from llmtrain.data.shards import TokenSplit

    n = 10**12
    shard = tmp_path / "train_000.bin"
    with open(shard, "wb") as f:
        f.truncate((n + 1) * 2)  # sparse: no disk blocks
    meta = {"dtype": "uint16", "splits": {"train": {"shards": [{"file": shard.name, "tokens": n + 1}]}}}
    before, anon_before = _rss_mb(), _rss_mb("RssAnon")
    start = time.perf_counter()
    reader = TokenWindowReader(TokenSplit.open(tmp_path, meta, "train"), 1, seed=3, rank=1, world_size=4)
    assert reader.num_windows == n
    ids = np.concatenate([reader.next_windows(100) for _ in range(100)])  # 10^4 samples: window ids
    seconds = time.perf_counter() - start
    grown = _rss_mb() - before
    x, y = reader.next_batch(100)  # and tokens, read from the memory map
    assert x.shape == (100, 1) and not x.any()
    assert seconds < 1.0 and grown < 20, (seconds, grown)
    assert _rss_mb("RssAnon") - anon_before < 20  # pages of the map are the file's cache, not the reader's
    assert len(np.unique(ids)) == len(ids) and ids.max() > n // 2
