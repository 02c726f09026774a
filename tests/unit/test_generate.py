"""Generation: the KV cache (and the LSTM state) equal full recomputation, padding in a batch changes nothing,
seeds reproduce samples, and top-k / top-p keep exactly the right tokens."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from llmtrain.config import MLP, Arch, ModelConfig, Norm, Positions, SamplingConfig
from llmtrain.errors import UserError
from llmtrain.generate import TextGenerator, filter_logits
from llmtrain.model import build_model

TINY = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=97, init_std=0.3)
MODELS = {
    "gpt2": TINY,
    "llama_gqa": dataclasses.replace(TINY, n_kv_head=2, norm=Norm.rmsnorm, mlp=MLP.swiglu, pos=Positions.rope,
                                     tie_embeddings=False),
    "lstm": dataclasses.replace(TINY, arch=Arch.lstm, n_head=1),
}
EOD = 1
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eod=False)


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(4)  # init_std=0.3 and this seed: greedy decoding does not collapse into one repeated token
    return build_model(MODELS[name]).eval()


def generator_of(model) -> TextGenerator:
    return TextGenerator(model, SimpleNamespace(eod_id=EOD), torch.device("cpu"))


def recompute_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by running the whole sequence again for every new token (no cache)."""
    ids, all_logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([ids]))
            all_logits.append(logits[0, -1])
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):], all_logits


@pytest.mark.parametrize("name", MODELS)
def test_cache_equals_recomputation(name):
    model = model_of(name)
    prompt = [EOD, 5, 17, 42, 8, 63]
    expected, expected_logits = recompute_greedy(model, prompt, GREEDY.max_new_tokens)
    cache = model.new_cache(torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]), cache=cache)
        got, got_logits = [], []
        for _ in range(GREEDY.max_new_tokens):
            got_logits.append(logits[0, -1])
            got.append(int(logits[0, -1].argmax()))
            logits, _ = model(torch.tensor([[got[-1]]]), cache=cache)
    assert got == expected
    assert len(set(got)) > 1  # a real sequence, not one repeated token
    for a, b in zip(got_logits, expected_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert generator_of(model).generate_ids([prompt], GREEDY, seed=0) == [expected]


@pytest.mark.parametrize("name", MODELS)
def test_padded_batch_equals_each_prompt_alone(name):
    model = model_of(name)
    prompts = [[EOD, 3], [EOD, 9, 14, 27, 33, 50, 71], [EOD, 60, 2, 2]]
    gen = generator_of(model)
    alone = [gen.generate_ids([p], GREEDY, seed=0)[0] for p in prompts]
    assert gen.generate_ids(prompts, GREEDY, seed=0) == alone


@pytest.mark.parametrize("name", ["gpt2", "lstm"])
def test_seed_reproduces_samples(name):
    gen = generator_of(model_of(name))
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.5, top_k=40, stop_at_eod=False)
    prompts = [[EOD, 4, 5], [EOD, 7]]
    first = gen.generate_ids(prompts, sampling, seed=7)
    assert gen.generate_ids(prompts, sampling, seed=7) == first
    assert gen.generate_ids(prompts, sampling, seed=8) != first


def test_stop_at_eod_cuts_each_row():
    model = model_of("gpt2")
    gen = generator_of(model)
    with torch.no_grad():  # make EOD the certain next token after token 3 only
        model.lm_head.weight[EOD] = 0
    free = gen.generate_ids([[EOD, 3]], GREEDY, seed=0)[0]
    stopping = dataclasses.replace(GREEDY, stop_at_eod=True)
    cut = gen.generate_ids([[EOD, 3]], stopping, seed=0)[0]
    assert EOD not in cut and cut == free[: len(cut)]


def test_top_k_keeps_the_k_largest():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted: 0.5, 0.3, 0.15, 0.05 -> mass before each: 0, 0.5, 0.8, 0.95
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, False, False]]
    # both filters: top-k first, then the nucleus of what is left (renormalised: 0.625, 0.375)
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6)).tolist() == [[False, True, False, False]]


def test_sampling_follows_the_filtered_distribution():
    gen = generator_of(model_of("gpt2"))
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(4000, 4)
    sampling = SamplingConfig(temperature=1.0, top_p=0.75)
    from llmtrain.generate import next_tokens

    tokens = next_tokens(logits, sampling, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() - 0.5 / 0.8) < 0.03  # renormalised over the nucleus {0.5, 0.3}
    del gen


def test_long_prompt_is_cut_from_the_left_and_too_many_tokens_refused(caplog):
    gen = TextGenerator(model_of("gpt2"), SimpleNamespace(eod_id=EOD, encode=lambda s: [5] * len(s)),
                        torch.device("cpu"))
    with caplog.at_level("WARNING", logger="llmtrain"):
        ids = gen.prompt_ids("x" * 40, max_new_tokens=10)
    assert len(ids) == TINY.block_size - 10 and "cut to its last 14" in caplog.text
    with pytest.raises(UserError, match="max_new_tokens=24 leaves no room"):
        gen.prompt_ids("x", max_new_tokens=24)
    lstm = TextGenerator(model_of("lstm"), SimpleNamespace(eod_id=EOD, encode=lambda s: [5] * len(s)),
                         torch.device("cpu"))
    assert len(lstm.prompt_ids("x" * 40, max_new_tokens=100)) == 41  # no context limit


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k=-2 must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
])
def test_bad_sampling_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**bad)
