"""Mixtures of experts in and out of transformers (fp32, dropless, CPU): an exported Mixtral or Qwen2-MoE computes our
logits and greedy tokens; an imported one gives every expert exactly its own tensors and goes back bitwise; what has
no exact equivalent is refused in one line. And the KV cache of a mixture of experts equals recomputation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from llmtrain.config import MLP, ModelConfig, Norm, Positions, SamplingConfig
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError
from llmtrain.generate import TextGenerator
from llmtrain.model import build_model
from llmtrain.run.trained import TrainedModel, load_trained, open_trained
from tests.hf_models import greedy_pair, save_random_hf

transformers = pytest.importorskip("transformers")
VOCAB = 300
MOE = ModelConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=32, block_size=32, vocab_size=VOCAB, init_std=0.3,
                  norm=Norm.rmsnorm, mlp=MLP.swiglu, pos=Positions.rope, rope_theta=500.0, tie_embeddings=False,
                  mlp_hidden=40, n_experts=4, experts_per_token=2, moe_hidden=24)
EXPORTS = {  # name: (our model, the family it exports as)
    "every_block": (MOE, "mixtral"),
    "every_block_tied_top1": (dataclasses.replace(MOE, tie_embeddings=True, experts_per_token=1), "mixtral"),
    "every_second_block": (dataclasses.replace(MOE, moe_every=2), "qwen2_moe"),
    "not_renormalized": (dataclasses.replace(MOE, router_renormalize=False), "qwen2_moe"),
    "shared_experts": (dataclasses.replace(MOE, n_shared_experts=2, moe_every=2, router_renormalize=False),
                       "qwen2_moe"),
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / tokenizer.file_name
    tokenizer.save(path)
    return path


def trained_of(cfg: ModelConfig, tokenizer: Tokenizer, folder: Path) -> TrainedModel:
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial norms and a router that tells the experts apart
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif "router" in name:
                param.normal_(0.0, 0.5)
    return TrainedModel(cfg, model.state_dict(), tokenizer, folder, step=7, tokens_seen=123)


def stored(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def logits_gap(theirs, ours, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (theirs(ids).logits - ours(ids)[0]).abs().max().item()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # a Qwen2-MoE without shared experts
@pytest.mark.parametrize("name", EXPORTS)
def test_exported_logits_and_greedy_tokens_equal_ours(name, tokenizer, tmp_path):
    from llmtrain.export.hf import save_hf

    cfg, family = EXPORTS[name]
    trained = trained_of(cfg, tokenizer, tmp_path)
    assert save_hf(trained, tmp_path / "hf") == family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf = theirs.config
    assert hf.model_type == family and hf.num_experts_per_tok == cfg.experts_per_token
    if family == "qwen2_moe":
        assert (hf.decoder_sparse_step, hf.norm_topk_prob) == (cfg.moe_every, cfg.router_renormalize)
        assert (hf.moe_intermediate_size, hf.intermediate_size, hf.shared_expert_intermediate_size, hf.qkv_bias) == (
            24, 40, 24 * cfg.n_shared_experts, False)
    ours = trained.build()
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    gap = logits_gap(theirs, ours, ids)
    print(f"\n{name} -> {family}: max |logit diff| = {gap:.3g}")
    assert gap <= 1e-4, gap
    mine, hf_tokens = greedy_pair(ours, theirs, tokenizer, [tokenizer.eod_id, *tokenizer.encode("def f(x):\n")])
    assert mine == hf_tokens and len(set(mine)) > 1
    again = load_trained(tmp_path / "hf")  # and back: the same architecture, the same tensors
    for field in ("n_experts", "moe_every", "experts_per_token", "router_renormalize", "n_shared_experts",
                  "expert_hidden", "kv_heads", "tie_embeddings"):
        assert getattr(again.model_cfg, field) == getattr(cfg, field), field
    assert set(again.state_dict) == set(trained.state_dict) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    for key, tensor in again.state_dict.items():
        assert torch.equal(tensor, trained.state_dict[key]), key


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_import_gives_each_expert_its_own_tensors_and_exports_back_bitwise(kind, tokenizer_file, tokenizer, tmp_path):
    from llmtrain.export.hf import save_hf

    theirs = save_random_hf(kind, tmp_path / kind, tokenizer_file, VOCAB)
    source = theirs.state_dict()  # transformers 5 holds the experts stacked: (E, 2I, H) and (E, H, I)
    whole, sliced = load_trained(tmp_path / kind), open_trained(tmp_path / kind)
    cfg = whole.model_cfg
    assert cfg.n_experts == 4 and cfg.experts_per_token == 2 and cfg.expert_hidden == 24
    assert (cfg.moe_every, cfg.n_shared_experts, cfg.router_renormalize) == (
        (1, 0, True) if kind == "mixtral" else (2, 2, False))
    assert type(sliced.state_dict).__name__ == "SafetensorsWeights"  # read from the stored tensors, by slices
    assert len(cfg.sparse_layers) == (3 if kind == "mixtral" else 2)
    for i in cfg.sparse_layers:
        mlp = f"model.layers.{i}.mlp."
        expected = {f"blocks.{i}.mlp.router.weight": source[mlp + "gate.weight"]}
        for e in range(cfg.n_experts):
            expected[f"blocks.{i}.mlp.experts.{e}.up.weight"] = source[mlp + "experts.gate_up_proj"][e]
            expected[f"blocks.{i}.mlp.experts.{e}.down.weight"] = source[mlp + "experts.down_proj"][e]
        if cfg.n_shared_experts:
            shared = mlp + "shared_expert."
            expected[f"blocks.{i}.mlp.shared.up.weight"] = torch.cat([source[shared + "gate_proj.weight"],
                                                                      source[shared + "up_proj.weight"]])
            expected[f"blocks.{i}.mlp.shared.down.weight"] = source[shared + "down_proj.weight"] / 2
        for name, tensor in expected.items():
            assert torch.equal(whole.state_dict[name], tensor), name
            assert torch.equal(sliced.state_dict[name], tensor), name
        ups = [whole.state_dict[f"blocks.{i}.mlp.experts.{e}.up.weight"] for e in range(cfg.n_experts)]
        assert not any(torch.equal(ups[0], other) for other in ups[1:])  # a swap of two experts would show
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    gap = max(logits_gap(theirs, trained.build(), ids) for trained in (whole, sliced))
    print(f"\n{kind}: import max |logit diff| = {gap:.3g}")
    assert gap <= 1e-4, gap
    assert save_hf(sliced, tmp_path / "back") == kind
    original, back = stored(tmp_path / kind), stored(tmp_path / "back")
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_a_gated_shared_expert_is_refused(tokenizer_file, tmp_path):
    save_random_hf("qwen2_moe_gated", tmp_path / "gated", tokenizer_file, VOCAB)
    for load in (load_trained, open_trained):
        with pytest.raises(UserError, match=r"model.layers.1.mlp.shared_expert_gate.weight is not all 0 .*ungated"
                                            r".* \(and 1 more\)") as info:
            load(tmp_path / "gated")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"mlp": MLP.gelu}, "a mixture of experts with pos=rope, norm=rmsnorm, mlp=gelu, bias=false has no transformers"),
    ({"pos": Positions.learned}, "pos=learned, norm=rmsnorm, mlp=swiglu, bias=false has no transformers"),
    ({"norm": Norm.layernorm}, "norm=layernorm"),
    ({"bias": True}, "bias=true has no transformers equivalent"),
])
def test_export_without_an_exact_equivalent_is_one_line(change, message, tokenizer, tmp_path):
    from llmtrain.export.hf import save_hf

    trained = trained_of(dataclasses.replace(MOE, **change), tokenizer, tmp_path)
    with pytest.raises(UserError, match=message) as info:
        save_hf(trained, tmp_path / "hf")
    assert "\n" not in str(info.value) and "use format=safetensors" in str(info.value)
    assert not (tmp_path / "hf").exists()


def test_qwen3_moe_is_refused_for_its_query_and_key_norms(tmp_path):
    from llmtrain.hf_mapping import model_config_of

    with pytest.raises(UserError, match=r"model_type=qwen3_moe is not supported: .*\(q_norm, k_norm\)"):
        model_config_of(transformers.Qwen3MoeConfig(), tmp_path)


def test_kv_cache_of_a_mixture_of_experts_equals_recomputation():
    cfg = dataclasses.replace(EXPORTS["shared_experts"][0], vocab_size=97, block_size=24)
    torch.manual_seed(4)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.blocks[1::2]:
            block.mlp.router.weight.normal_(0.0, 0.5)
    prompt, steps = [1, 5, 17, 42, 8, 63], 12
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):  # the whole sequence again for each new token
            logits = model(torch.tensor([ids]))[0][0, -1]
            expected.append(logits)
            ids.append(int(logits.argmax()))
        cache = model.new_cache(torch.zeros(1, dtype=torch.long))
        logits = model(torch.tensor([prompt]), cache=cache)[0]
        got = []
        for _ in range(steps):
            got.append(logits[0, -1])
            logits = model(torch.tensor([[int(got[-1].argmax())]]), cache=cache)[0]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(set(ids[len(prompt):])) > 1
    generator = TextGenerator(model, dataclasses.make_dataclass("Eod", [("eod_id", int)])(1), torch.device("cpu"))
    greedy = SamplingConfig(max_new_tokens=steps, temperature=0.0, stop_at_eod=False)
    assert generator.generate_ids([prompt], greedy, seed=0) == [ids[len(prompt):]]
