"""The GPT: shapes, causality, every architecture option, parameter and FLOP counts, and a one-batch overfit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmtrain.config import MLP, ModelConfig, Norm, Positions
from llmtrain.model import GPT
from llmtrain.model.gpt import RMSNorm, apply_rope, rope_tables

TINY = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=97)
VARIANTS = {
    "gpt2": TINY,
    "llama": dataclasses.replace(TINY, n_kv_head=2, norm=Norm.rmsnorm, mlp=MLP.swiglu, pos=Positions.rope,
                                 tie_embeddings=False),
    "mqa_bias": dataclasses.replace(TINY, n_kv_head=1, bias=True),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_loss(name):
    torch.manual_seed(0)
    model = GPT(VARIANTS[name])
    idx, targets = torch.randint(0, 97, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 97)
    # freshly initialised: close to the uniform distribution's loss ln(97) = 4.575
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.1


@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    torch.manual_seed(0)
    model = GPT(VARIANTS[name]).eval()
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 97  # change only the future of position 9
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6)
    assert not torch.allclose(la[0, 10:], lb[0, 10:], atol=1e-3)


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="longer than block_size=16"):
        GPT(TINY)(torch.zeros(1, 17, dtype=torch.long))


def test_grouped_query_attention_shrinks_kv():
    full = GPT(TINY).blocks[0].attn.qkv.weight.shape[0]
    gqa = GPT(dataclasses.replace(TINY, n_kv_head=2)).blocks[0].attn.qkv.weight.shape[0]
    assert full == 3 * 32 and gqa == 32 + 2 * 2 * 8


def test_tied_embeddings_share_storage():
    model = GPT(TINY)
    assert model.lm_head.weight is model.wte.weight
    untied = GPT(dataclasses.replace(TINY, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight


def test_parameter_count_of_small_preset():
    cfg = ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)
    model = GPT(cfg)
    per_layer = 12 * 384**2 + 2 * 384  # qkv + proj + up + down (no bias) + two LayerNorm weights
    expected = 6 * per_layer + 384 + 8192 * 384  # final norm + tied embedding
    assert model.num_params() == expected == 13_767_552
    assert model.num_params(non_embedding=False) == expected + 256 * 384
    assert model.flops_per_token() == 6 * expected + 12 * 6 * 6 * 64 * 256


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=16, vocab_size=97))
    block = model.blocks[0]
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.001
    assert abs(block.attn.proj.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2 * 8) = 1/4


def test_rmsnorm_matches_definition():
    norm = RMSNorm(8, eps=1e-6, bias=False)
    x = torch.randn(4, 8)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_rope_preserves_norm_and_is_relative():
    cos, sin = rope_tables(8, 32, 10000.0)
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 1, 8)
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, hs/2): over the heads of (B, T, nh, hs)
    qs = apply_rope(q.expand(1, 32, 1, 8), cos, sin)[0, :, 0]
    ks = apply_rope(k.expand(1, 32, 1, 8), cos, sin)[0, :, 0]
    assert torch.allclose(qs.norm(dim=-1), q.norm().expand(32), atol=1e-5)
    # the score depends only on the distance between positions
    assert torch.allclose((qs[5] * ks[3]).sum(), (qs[12] * ks[10]).sum(), atol=1e-5)


@pytest.mark.slow  # 150 optimizer steps: seconds on an idle core, far more on a busy one
def test_one_batch_overfit():
    torch.manual_seed(0)
    model = GPT(VARIANTS["llama"])
    idx = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_config_checks():
    with pytest.raises(ValueError, match="model.n_embd=30 must be divisible by model.n_head=4"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="model.n_head=4 must be divisible by model.n_kv_head=3"):
        ModelConfig(n_embd=32, n_head=4, n_kv_head=3)
