"""The Kneser-Ney baseline: probabilities worked out by hand, normalisation, batch == scalar, and a real corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmtrain.baselines.ngram import KneserNeyLM
from llmtrain.data.reader import PreparedData

# The hand-worked corpus: one sequence, vocab_size 4 (token 3 never occurs), discount D = 0.5 at every order.
CORPUS = [np.array([0, 1, 0, 1, 2])]
VOCAB, D = 4, 0.5


def test_order_2_by_hand():
    # Top order, raw bigram counts: c(0,1) = 2, c(1,0) = 1, c(1,2) = 1.
    #   history 0: c(0) = 2, N1+(0 .) = 1;  history 1: c(1) = 2, N1+(1 .) = 2;  histories 2, 3: never seen.
    # Order 1, continuation counts N1+(. w): 0 <- {1}, 1 <- {0}, 2 <- {1}, 3 <- {} => 1, 1, 1, 0;
    #   total 3, 3 types, so P_1(w) = (1 - 1/2)/3 + (1/2)(3/3)(1/4) = 1/6 + 1/8 = 7/24 for w in {0, 1, 2},
    #   and P_1(3) = 0 + 1/8 = 1/8 (sum: 3 * 7/24 + 3/24 = 1).
    model = KneserNeyLM(2, VOCAB, discount=D).fit(CORPUS)
    # seen bigram: (2 - 1/2)/2 + (1/2)(1/2) P_1(1) = 3/4 + 7/96 = 79/96
    assert model.prob([0], 1) == pytest.approx(79 / 96, abs=1e-12)
    # unseen bigram, seen history: 0 + (1/4) P_1(0) = 7/96
    assert model.prob([0], 0) == pytest.approx(7 / 96, abs=1e-12)
    # seen bigram with a two-type history: (1 - 1/2)/2 + (1/2)(2/2) P_1(0) = 1/4 + 7/48 = 19/48
    assert model.prob([1], 0) == pytest.approx(19 / 48, abs=1e-12)
    # unseen token after a seen history: (1/2)(2/2) P_1(3) = 1/16
    assert model.prob([1], 3) == pytest.approx(1 / 16, abs=1e-12)
    # unseen history: back off entirely to P_1
    assert model.prob([2], 0) == pytest.approx(7 / 24, abs=1e-12)
    assert model.prob([3], 3) == pytest.approx(1 / 8, abs=1e-12)
    assert model.num_ngrams == {1: 3, 2: 3}


def test_order_3_short_history_uses_continuation_counts():
    # Trigrams (raw): (0,1,0), (1,0,1), (0,1,2), once each. Bigram continuation counts from them:
    # N1+(. 1 0) = 1, N1+(. 0 1) = 1, N1+(. 1 2) = 1. Unigram continuations as in the order-2 case (P_1 = 7/24).
    model = KneserNeyLM(3, VOCAB, discount=D).fit(CORPUS)
    # Position 0 of a window has history [0] only: P_2(1 | 0) with continuation counts, c(0) = 1, N1+(0 .) = 1:
    #   (1 - 1/2)/1 + (1/2)(1/1)(7/24) = 1/2 + 7/48 = 31/48
    # Position 1 has history [0, 1]: c(0 1) = 2, N1+(0 1 .) = 2, and P_2(2 | 1) = 1/4 + (1/2)(7/24) = 19/48:
    #   (1 - 1/2)/2 + (1/2)(2/2)(19/48) = 1/4 + 19/96 = 43/96
    probs = np.exp(model.log_probs(np.array([[0, 1, 2]])))
    np.testing.assert_allclose(probs, [[31 / 48, 43 / 96]], rtol=0, atol=1e-12)
    assert model.prob([0], 1) == pytest.approx(31 / 48, abs=1e-12)
    assert model.prob([3, 0, 1], 2) == pytest.approx(43 / 96, abs=1e-12)  # only the last order-1 tokens count


def test_order_1_by_hand():
    # Raw counts 0: 2, 1: 2, 2: 1, 3: 0; total 5, 3 types. P(w) = max(c - 1/2, 0)/5 + (1/2)(3/5)(1/4):
    #   P(0) = P(1) = 3/10 + 3/40 = 3/8,  P(2) = 1/10 + 3/40 = 7/40,  P(3) = 3/40.
    model = KneserNeyLM(1, VOCAB, discount=D).fit(CORPUS)
    expected = [3 / 8, 3 / 8, 7 / 40, 3 / 40]
    assert [model.prob([], w) for w in range(VOCAB)] == pytest.approx(expected, abs=1e-12)
    assert model.prob([1, 2], 0) == pytest.approx(3 / 8, abs=1e-12)  # a unigram model ignores its history
    np.testing.assert_allclose(np.exp(model.log_probs(np.array([[3, 0, 2, 3]]))), [[3 / 8, 7 / 40, 3 / 40]],
                               rtol=0, atol=1e-12)


def test_estimated_discount_from_count_of_counts():
    # Counts 0: 2, 1: 1, 2: 2, 3: 1 -> n1 = 2, n2 = 2 -> D = 2 / (2 + 2 * 2) = 1/3.
    model = KneserNeyLM(1, 5).fit([np.array([0, 0, 1, 2, 2, 3])])
    assert model.discounts == {1: pytest.approx(1 / 3, abs=1e-15)}
    # P(4), never seen: (1/3)(4 types / 6 tokens)(1/5) = 2/45
    assert model.prob([], 4) == pytest.approx(2 / 45, abs=1e-12)


def test_ngrams_do_not_cross_sequences():
    model = KneserNeyLM(2, 4, discount=D).fit([np.array([0, 1]), np.array([2, 0])])
    # bigrams (0,1), (2,0) only: joined, (1,2) would make a third; unigram continuations only for 1 and 0
    assert model.num_ngrams == {1: 2, 2: 2}
    assert model.prob([1], 2) == pytest.approx(D * 1 / 4, abs=1e-12)  # history 1 never seen -> P_1(2) = 1/8


def random_corpus(vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    """Sequences with some structure (a noisy cycle) that never use the last token id."""
    rng = np.random.default_rng(seed)
    sequences = []
    for length in (1, 2, 40, 300, 500):
        steps = rng.choice([1, 1, 1, 2, 3], size=length)
        sequences.append(np.cumsum(steps) % (vocab_size - 1))
    return sequences


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("discount", [None, 0.7])
def test_probabilities_sum_to_one(order, discount):
    vocab_size = 9
    corpus = random_corpus(vocab_size)
    model = KneserNeyLM(order, vocab_size, discount=discount).fit(corpus)
    unseen = vocab_size - 1
    histories = [[], [int(corpus[-1][5])], list(corpus[-1][10:10 + order - 1]), list(corpus[-2][:order + 2]),
                 [unseen] * order, [0, unseen, 1][:order]]
    for history in histories:
        total = sum(model.prob(history, w) for w in range(vocab_size))
        assert total == pytest.approx(1.0, abs=1e-9), history
    # the batched path normalises too: score every token after the same (long enough) history
    rows = np.array([[*histories[3], w] for w in range(vocab_size)])
    assert np.exp(model.log_probs(rows)[:, -1]).sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_log_probs_match_prob(order):
    vocab_size = 9
    model = KneserNeyLM(order, vocab_size).fit(random_corpus(vocab_size))
    windows = np.concatenate([random_corpus(vocab_size, seed=1)[-1][:27].reshape(3, 9),
                              np.random.default_rng(2).integers(0, vocab_size, size=(2, 9))])
    log_probs = model.log_probs(windows)
    assert log_probs.shape == (5, 8) and log_probs.dtype == np.float64
    for b in range(windows.shape[0]):
        for t in range(windows.shape[1] - 1):
            history = windows[b, max(0, t - order + 2): t + 1]
            assert np.exp(log_probs[b, t]) == pytest.approx(model.prob(list(history), int(windows[b, t + 1])),
                                                            rel=1e-12)
    assert model.perplexity(windows) == pytest.approx(float(np.exp(-log_probs.mean())), rel=1e-12)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="int64"):
        KneserNeyLM(5, 8192)  # 8192**5 = 2**65
    with pytest.raises(ValueError, match="order"):
        KneserNeyLM(0, 10)
    with pytest.raises(ValueError, match="outside"):
        KneserNeyLM(2, 4).fit([np.array([0, 4])])
    with pytest.raises(ValueError, match="outside"):
        KneserNeyLM(2, 4).fit(CORPUS).log_probs(np.array([[0, -1]]))


def test_order_3_beats_unigram_on_prepared_data(prepared_small):
    data = PreparedData(prepared_small)
    shards = data.split("train").shards
    val = data.val_windows(block_size=64)
    windows = np.concatenate([torch.cat([x, y[:, -1:]], dim=1).numpy() for x, y in val.batches(32)])
    unigram = KneserNeyLM(1, data.vocab_size).fit(shards).perplexity(windows)
    trigram = KneserNeyLM(3, data.vocab_size).fit(shards).perplexity(windows)
    assert np.isfinite(trigram)
    assert trigram < unigram < data.vocab_size


def test_default_seed_is_the_training_runs():
    # train_tokens=N fits on the windows a run reads first; by default that must be a default training run's.
    from llmtrain.config import NgramConfig, TrainLoopConfig

    assert NgramConfig().seed == TrainLoopConfig().seed
