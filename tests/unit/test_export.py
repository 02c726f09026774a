"""Consolidated export round trip, and export to transformers: its logits equal ours (fp32) and greedy generations
are identical, for the GPT-2 family and the Llama family."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmtrain.config import MLP, Arch, ModelConfig, Norm, Positions
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError
from llmtrain.model import build_model
from llmtrain.run.trained import TrainedModel, load_trained, save_consolidated
from tests.hf_models import greedy_pair

BASE = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=1024, init_std=0.1)
FAMILIES = {
    "gpt2": BASE,
    "gpt2_bias_untied": dataclasses.replace(BASE, bias=True, tie_embeddings=False),
    "gpt2_gelu_exact": dataclasses.replace(BASE, mlp=MLP.gelu_exact),
    "llama": dataclasses.replace(BASE, n_kv_head=2, norm=Norm.rmsnorm, mlp=MLP.swiglu, pos=Positions.rope,
                                 tie_embeddings=False, rope_theta=500.0),
    "llama_tied": dataclasses.replace(BASE, norm=Norm.rmsnorm, mlp=MLP.swiglu, pos=Positions.rope),
}


def trained_of(cfg: ModelConfig, tokenizer: Tokenizer, tmp_path) -> TrainedModel:
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up in the mapping shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return TrainedModel(cfg, model.state_dict(), tokenizer, tmp_path, step=7, tokens_seen=123)


@pytest.fixture(scope="module")
def tokenizer(prepared_small) -> Tokenizer:
    return Tokenizer.load(prepared_small / "tokenizer.model")


def test_consolidated_round_trip(tokenizer, tmp_path):
    trained = trained_of(FAMILIES["llama"], tokenizer, tmp_path)
    out = save_consolidated(trained, tmp_path / "export")
    again = load_trained(out)
    assert again.step == 7 and again.tokens_seen == 123 and again.model_cfg == trained.model_cfg
    x = torch.randint(0, 1024, (2, 32))
    torch.testing.assert_close(again.build()(x)[0], trained.build()(x)[0], rtol=0, atol=0)
    half = load_trained(save_consolidated(trained, tmp_path / "bf16", dtype="bf16"))
    assert half.state_dict["wte.weight"].dtype == torch.bfloat16
    assert (half.build()(x)[0] - trained.build()(x)[0]).abs().max() < 0.05


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_logits_and_greedy_tokens_equal_ours(name, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmtrain.export.hf import save_hf

    trained = trained_of(FAMILIES[name], tokenizer, tmp_path)
    family = save_hf(trained, tmp_path / "hf")
    assert family == name.split("_")[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = trained.build()
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n")[:32]])
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids)[0]).abs().max().item()
    assert diff <= 1e-4, diff
    mine, hf = greedy_pair(ours, theirs, tokenizer, [tokenizer.eod_id, *tokenizer.encode("import os\n")])
    assert mine == hf


def test_mixed_or_recurrent_architectures_are_refused(tokenizer, tmp_path):
    pytest.importorskip("transformers")
    from llmtrain.export.hf import save_hf

    for cfg, message in [(dataclasses.replace(BASE, pos=Positions.rope), "mixes the GPT-2"),
                         (dataclasses.replace(BASE, n_kv_head=2), "no grouped-query attention"),
                         (dataclasses.replace(BASE, arch=Arch.lstm, n_head=1), "arch=lstm has no transformers")]:
        with pytest.raises(UserError, match=message):
            save_hf(trained_of(cfg, tokenizer, tmp_path), tmp_path / "hf")
