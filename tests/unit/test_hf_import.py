"""Import from transformers folders that transformers wrote (model.init_from / load_trained): our logits equal
theirs in fp32, the export goes back to the same tensors, and what our GPT cannot compute is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmtrain.config import MLP
from llmtrain.errors import UserError
from llmtrain.run.trained import load_trained
from tests.hf_models import KINDS, hf_config, save_random_hf

transformers = pytest.importorskip("transformers")
VOCAB = 1024  # prepared_small's tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(prepared_small) -> Path:
    return prepared_small / "tokenizer.model"


def logits_gap(theirs, ours, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (theirs(ids).logits - ours(ids)[0]).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_imported_logits_equal_transformers(kind, tokenizer_file, tmp_path):
    theirs = save_random_hf(kind, tmp_path / kind, tokenizer_file, VOCAB)
    trained = load_trained(tmp_path / kind)
    assert trained.step == 0 and trained.model_cfg.block_size == 128 and trained.model_cfg.vocab_size == VOCAB
    assert trained.model_cfg.tie_embeddings == (kind in ("gpt2", "gpt2_gelu"))
    assert trained.model_cfg.mlp == {"gpt2_gelu": MLP.gelu_exact, "llama": MLP.swiglu, "mistral": MLP.swiglu}.get(
        kind, MLP.gelu)
    assert trained.model_cfg.kv_heads == (4 if kind.startswith("gpt2") else 2)
    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(0))
    gap = logits_gap(theirs, trained.build(), ids)
    print(f"\n{kind}: import max |logit diff| = {gap:.3g} (fp32; logits up to "
          f"{theirs(ids).logits.abs().max().item():.1f})")
    assert gap <= 1e-4, gap


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt2_gelu"])
def test_round_trip_returns_the_same_tensors_and_logits(kind, tokenizer_file, tmp_path):
    from llmtrain.export.hf import save_hf

    theirs = save_random_hf(kind, tmp_path / kind, tokenizer_file, VOCAB)
    save_hf(load_trained(tmp_path / kind), tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    original = theirs.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap = (back(ids).logits - theirs(ids).logits).abs().max().item()
    print(f"\n{kind}: round trip max |logit diff| = {gap:.3g}")
    assert gap <= 1e-4


def test_block_size_cuts_learned_positions_and_cannot_grow_them(tokenizer_file, tmp_path):
    theirs = save_random_hf("gpt2", tmp_path / "gpt2", tokenizer_file, VOCAB)
    short = load_trained(tmp_path / "gpt2", block_size=32)
    assert short.model_cfg.block_size == 32 and short.state_dict["wpe.weight"].shape == (32, 64)
    ids = torch.randint(0, VOCAB, (2, 32))
    assert logits_gap(theirs, short.build(), ids) <= 1e-4
    with pytest.raises(UserError, match="learned positions for 128 tokens, fewer than model.block_size=256"):
        load_trained(tmp_path / "gpt2", block_size=256)


def test_folder_without_tokenizer_is_refused(tmp_path):
    save_random_hf("llama", tmp_path / "bare", None, VOCAB)
    with pytest.raises(UserError, match="has no tokenizer"):
        load_trained(tmp_path / "bare")


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("gpt2", {"activation_function": "relu"}, "activation_function=relu is not supported"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act=gelu is not supported"),
    ("llama", {"attention_bias": True}, "attention_bias=true is not supported"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
     "rope_scaling type=linear is not supported"),
    ("llama", {"head_dim": 32}, "head_dim=32 is not hidden_size / num_attention_heads = 16"),
    ("mistral", {"sliding_window": 16}, "sliding_window=16 is not supported"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
    ("mixtral", {"sliding_window": 16}, "sliding_window=16 is not supported"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act=gelu is not supported"),
    ("qwen2_moe", {"qkv_bias": True}, "qkv_bias=true is not supported"),
    ("qwen2_moe", {"mlp_only_layers": [1, 2]}, r"mlp_only_layers=\[1\] is not supported"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 30}, "shared_expert_intermediate_size=30 is not a multiple"),
])
def test_what_our_gpt_cannot_compute_is_refused_naming_the_field(kind, change, message, tmp_path):
    from llmtrain.hf_mapping import model_config_of

    config = hf_config(kind, VOCAB)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UserError, match=message) as info:
        model_config_of(config, tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path / "config.json") in str(info.value)


def test_other_model_types_are_refused(tmp_path):
    from llmtrain.hf_mapping import model_config_of

    with pytest.raises(UserError, match="model_type=bert is not supported"):
        model_config_of(transformers.BertConfig(), tmp_path)
