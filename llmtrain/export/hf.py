"""Export to a Hugging Face ``transformers`` folder: GPT-2 for learned-positions / LayerNorm / GELU models, Llama for
RoPE / RMSNorm / SwiGLU ones (grouped-query attention included). Pure renaming and reshaping of the weights:

- GPT-2 stores its projections as ``Conv1D`` (in, out), so our (out, in) linear weights are transposed, and it
  always has biases and LayerNorm biases: models trained without them get zeros (the same function).
- Llama splits our fused ``qkv`` into q/k/v projections and our fused SwiGLU ``up`` (gate rows first) into
  gate/up projections; both rotate the same channel halves in RoPE, so no permutation is needed.

``transformers`` is an optional extra (``pip install 'llmtrain[hf]'``), imported only here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmtrain.config import MLP, Arch, ModelConfig, Norm, Positions
from llmtrain.dtypes import torch_dtype
from llmtrain.errors import UserError
from llmtrain.export.consolidate import TrainedModel


def hf_family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama', or a UserError saying why the architecture has no transformers equivalent."""
    if cfg.arch != Arch.gpt:
        raise UserError(f"model arch={cfg.arch.value} has no transformers equivalent; use format=safetensors")
    if cfg.pos == Positions.learned and cfg.norm == Norm.layernorm and cfg.mlp == MLP.gelu:
        if cfg.kv_heads != cfg.n_head:
            raise UserError("GPT-2 has no grouped-query attention (model.n_kv_head); use format=safetensors")
        return "gpt2"
    if cfg.pos == Positions.rope and cfg.norm == Norm.rmsnorm and cfg.mlp == MLP.swiglu:
        if cfg.bias:
            raise UserError("Llama's RMSNorm has no bias (model.bias=true); use format=safetensors")
        return "llama"
    raise UserError(f"pos={cfg.pos.value}, norm={cfg.norm.value}, mlp={cfg.mlp.value} mixes the GPT-2 "
                    "(learned/layernorm/gelu) and Llama (rope/rmsnorm/swiglu) families; use format=safetensors")


def _gpt2(cfg: ModelConfig, sd: dict[str, torch.Tensor], eod: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_inner=cfg.hidden, activation_function="gelu_new", resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
                        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eod, eos_token_id=eod)

    def bias(name: str, size: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(size))

    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": bias("norm_f.bias", cfg.n_embd)}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for src, dst in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[theirs + dst + ".weight"] = sd[ours + src + ".weight"]
            out[theirs + dst + ".bias"] = bias(ours + src + ".bias", cfg.n_embd)
        for src, dst in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                         ("mlp.down", "mlp.c_proj")):
            weight = sd[ours + src + ".weight"]
            out[theirs + dst + ".weight"] = weight.t().contiguous()  # Conv1D is (in, out)
            out[theirs + dst + ".bias"] = bias(ours + src + ".bias", weight.shape[0])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return GPT2LMHeadModel(config), out


def _llama(cfg: ModelConfig, sd: dict[str, torch.Tensor], eod: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                         max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
                         bos_token_id=eod, eos_token_id=eod)
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[ours + "attn.qkv.weight"].split([q, kv, kv], dim=0)
        gate, up = sd[ours + "mlp.up.weight"].chunk(2, dim=0)
        out.update({theirs + "input_layernorm.weight": sd[ours + "norm1.weight"],
                    theirs + "post_attention_layernorm.weight": sd[ours + "norm2.weight"],
                    theirs + "self_attn.q_proj.weight": wq, theirs + "self_attn.k_proj.weight": wk,
                    theirs + "self_attn.v_proj.weight": wv,
                    theirs + "self_attn.o_proj.weight": sd[ours + "attn.proj.weight"],
                    theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
                    theirs + "mlp.down_proj.weight": sd[ours + "mlp.down.weight"]})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return LlamaForCausalLM(config), out


def save_hf(trained: TrainedModel, out: str | Path, dtype: str = "fp32") -> str:
    """Write a folder ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load; returns the family."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("format=hf needs transformers: pip install 'llmtrain[hf]'") from None
    from llmtrain.export.hf_tokenizer import save_hf_tokenizer

    family = hf_family(trained.model_cfg)
    build = _gpt2 if family == "gpt2" else _llama
    model, weights = build(trained.model_cfg, trained.state_dict, trained.tokenizer.eod_id)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if trained.model_cfg.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)  # the mapping covers every weight
    model = model.to(torch_dtype(dtype)).eval()
    out = Path(out)
    model.save_pretrained(out)
    sp_model = out / "tokenizer.model"
    trained.tokenizer.save(sp_model)
    save_hf_tokenizer(sp_model, out)
    return family
