"""Weighted mixtures (``data.mix``): exact shares, one-counter state, the sources' own orders, one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmtrain.config import DataConfig, MixSource, NgramConfig, PrepareConfig
from llmtrain.data.mixture import PERIOD, MixedData, MixtureSchedule, quotas
from llmtrain.data.order import KeyedPermutation
from llmtrain.data.prepare import prepare
from llmtrain.data.reader import PreparedData, unigram_counts
from llmtrain.errors import UserError
from tests.conftest import small_data_config

BLOCK = 64


@pytest.fixture(scope="module")
def second(prepared_second):
    return prepared_second


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix") / "other"
    prepare(small_data_config(folder, max_documents=40, vocab_size=512))
    return folder


def mixed(*sources: tuple[object, float]) -> MixedData:
    return MixedData([MixSource(dir=str(d), weight=w) for d, w in sources])


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.7, 0.2, 0.1], [5, 1, 1, 3], [0.999, 0.001]])
def test_realized_shares_over_1e5_samples_match_the_weights(weights):
    schedule = MixtureSchedule(weights, seed=3)
    source, _ = schedule.locate(np.arange(100_000))
    realized = np.bincount(source, minlength=len(weights)) / 100_000
    assert np.abs(realized - np.asarray(weights) / np.sum(weights)).max() < 0.005
    # exact per period, up to one sample of rounding
    assert np.abs(quotas(weights) - PERIOD * np.asarray(weights) / np.sum(weights)).max() < 1


def test_each_source_gets_each_of_its_sample_numbers_once():
    schedule = MixtureSchedule([3, 2, 5], seed=1)
    n = 3 * PERIOD + 1234
    source, position = schedule.locate(np.arange(n))
    counts = schedule.samples_per_source(n)
    for k in range(3):
        assert list(position[source == k]) == list(range(counts[k]))  # in order, each once
    assert counts.sum() == n
    assert np.array_equal(schedule.samples_per_source(777), np.bincount(source[:777], minlength=3))


def test_interleaving_is_shuffled_and_keyed_by_the_seed():
    a, _ = MixtureSchedule([1, 1], seed=1).locate(np.arange(2000))
    b, _ = MixtureSchedule([1, 1], seed=2).locate(np.arange(2000))
    assert not np.array_equal(a, b)
    runs = np.flatnonzero(np.diff(a)).size  # a 50/50 blend alternates often, not in two long blocks
    assert runs > 500


def test_a_mix_of_one_source_is_that_source_alone(prepared_small):
    plain = PreparedData(prepared_small).train_reader(BLOCK, 7, 0, 1)
    mix = mixed((prepared_small, 1.0)).train_reader(BLOCK, 7, 0, 1)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(6), mix.next_batch(6), strict=True))


def test_each_source_keeps_its_own_epoch_order(prepared_small, second):
    data = mixed((prepared_small, 0.5), (second, 0.5))
    reader = data.train_reader(BLOCK, 7, 0, 1)
    x, _ = reader.next_batch(400)
    source, position = reader.schedule.locate(np.arange(400))
    alone = PreparedData(second).train_reader(BLOCK, 7, 0, 1)
    n = int((source == 1).sum())
    expected = alone.index.gather(alone.windows_at(np.arange(n)))[:, :-1]
    got = x[source == 1].numpy()
    assert np.array_equal(got, expected)


def test_same_global_order_for_any_world_size_and_resume_two_ranks_on_one(prepared_small, second):
    data = mixed((prepared_small, 0.7), (second, 0.3))
    reference = data.train_reader(BLOCK, 5, 0, 1)
    expected = [reference.next_batch(8)[0] for _ in range(6)]
    two = [data.train_reader(BLOCK, 5, rank, 2) for rank in range(2)]
    got = [torch.cat([r.next_batch(4)[0] for r in two]) for _ in range(3)]
    state = two[0].state_dict()
    assert two[1].state_dict() == state
    one = data.train_reader(BLOCK, 5, 0, 1)
    one.load_state_dict(state)
    got += [one.next_batch(8)[0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_changed_mix_is_refused_at_resume(prepared_small, second):
    state = mixed((prepared_small, 0.7), (second, 0.3)).train_reader(BLOCK, 5, 0, 1).state_dict()
    with pytest.raises(UserError, match="data mix"):
        mixed((prepared_small, 0.5), (second, 0.5)).train_reader(BLOCK, 5, 0, 1).load_state_dict(state)


def test_validation_parts_and_the_blend_entropy(prepared_small, second):
    data = mixed((prepared_small, 3), (second, 1))
    parts = data.validation(BLOCK, 10)
    assert [p.name for p in parts] == ["small", "second"] and [p.weight for p in parts] == [0.75, 0.25]
    p = [unigram_counts(PreparedData(d).split("val"), data.vocab_size) for d in (prepared_small, second)]
    blend = 0.75 * p[0] / p[0].sum() + 0.25 * p[1] / p[1].sum()
    blend = blend[blend > 0]
    assert data.unigram_entropy() == pytest.approx(-(blend * np.log(blend)).sum(), rel=1e-12)


def test_mismatched_tokenizers_and_missing_folders_are_one_line(prepared_small, other_tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"data.mix\[1\].dir=.*another tokenizer") as info:
        mixed((prepared_small, 1), (other_tokenizer, 1))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"data.mix\[1\]: .*not a prepared dataset"):
        mixed((prepared_small, 1), (tmp_path / "nowhere", 1))


@pytest.mark.parametrize("mix, message", [
    ([], "names no source"),
    ([MixSource(dir="a", weight=0.0)], r"data.mix\[0\].weight=0.0 must be > 0"),
    ([MixSource(dir="a", weight=-1.0)], r"must be > 0"),
    ([MixSource(dir="x/a"), MixSource(dir="y/a")], "repeat"),
])
def test_bad_mixes_are_refused_by_the_config(mix, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(dir="", mix=mix)


def test_a_mix_goes_with_training_only():
    with pytest.raises(ValueError, match="both set"):
        DataConfig(dir="data/x", mix=[MixSource(dir="a")])
    with pytest.raises(ValueError, match="prepare each source"):
        PrepareConfig(data=DataConfig(dir="", mix=[MixSource(dir="a")]))
    with pytest.raises(ValueError, match="ngram"):
        NgramConfig(data=DataConfig(dir="", mix=[MixSource(dir="a")]))


def test_a_tiny_weight_that_would_never_be_sampled_is_refused():
    with pytest.raises(UserError, match="never be sampled"):
        MixtureSchedule([1.0, 1e-6], seed=0)


def test_the_interleaving_permutation_is_the_documented_one():
    """Position q of period p has slot KeyedPermutation(PERIOD, (seed, p, tag))(q); pin it across a period's end."""
    schedule = MixtureSchedule([1, 1], seed=11)
    source, _ = schedule.locate(np.arange(PERIOD - 10, PERIOD + 10))
    slots = np.concatenate([KeyedPermutation(PERIOD, (11, p, 0x6D6978))(np.arange(a, b))
                            for p, a, b in ((0, PERIOD - 10, PERIOD), (1, 0, 10))])
    assert np.array_equal(source, (slots >= PERIOD // 2).astype(int))
