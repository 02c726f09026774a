"""llmtrain <-> Hugging Face ``transformers``: GPT-2 for learned-positions / LayerNorm / GELU models, Llama for
RoPE / RMSNorm / SwiGLU ones (grouped-query attention included). Both directions are pure renaming and reshaping
of the weights through one table, ``weight_pairs``:

- GPT-2 stores its projections as ``Conv1D`` (in, out), so our (out, in) linear weights are transposed, and it
  always has biases and LayerNorm biases: models trained without them are exported with zeros (the same function).
- Llama splits our fused ``qkv`` into q/k/v projections and our fused SwiGLU ``up`` (gate rows first) into
  gate/up projections; both rotate the same channel halves in RoPE, so no permutation is needed.

A transformers config maps onto ``ModelConfig`` (``model_config_of``); a setting llmtrain's GPT cannot represent is
refused in one line naming the field. Loading a folder is ``llmtrain.run.trained.load_hf`` (whole, through
transformers) or ``open_trained`` (rows read from its safetensors when needed, ``rows_of_pair``), writing one
``llmtrain.export.hf.save_hf``. ``transformers`` is an optional extra (``pip install 'llmtrain[hf]'``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import MLP, Arch, ModelConfig, Norm, Positions
from llmtrain.errors import UserError

LLAMA_TYPES = ("llama", "mistral")
"""``model_type`` values read as the Llama family (Mistral without sliding windows is a Llama)."""
GPT2_GELU = {"gelu_new": MLP.gelu, "gelu_pytorch_tanh": MLP.gelu, "gelu": MLP.gelu_exact}
"""GPT-2 activation names and our MLP that computes each: GELU's tanh approximation (GPT-2's own) or exact GELU."""


@dataclass(frozen=True)
class WeightPair:
    """One of our tensors and the transformers tensor(s) it is made of (several: stacked along dim 0)."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    """GPT-2's Conv1D stores (in, out), the transpose of our nn.Linear weight."""


def hf_family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama', or a UserError saying why the architecture has no transformers equivalent."""
    if cfg.arch != Arch.gpt:
        raise UserError(f"model arch={cfg.arch.value} has no transformers equivalent; use format=safetensors")
    if cfg.pos == Positions.learned and cfg.norm == Norm.layernorm and cfg.mlp in (MLP.gelu, MLP.gelu_exact):
        if cfg.kv_heads != cfg.n_head:
            raise UserError("GPT-2 has no grouped-query attention (model.n_kv_head); use format=safetensors")
        return "gpt2"
    if cfg.pos == Positions.rope and cfg.norm == Norm.rmsnorm and cfg.mlp == MLP.swiglu:
        if cfg.bias:
            raise UserError("Llama's RMSNorm has no bias (model.bias=true); use format=safetensors")
        return "llama"
    raise UserError(f"pos={cfg.pos.value}, norm={cfg.norm.value}, mlp={cfg.mlp.value} mixes the GPT-2 "
                    "(learned/layernorm/gelu) and Llama (rope/rmsnorm/swiglu) families; use format=safetensors")


def weight_pairs(cfg: ModelConfig, family: str) -> list[WeightPair]:
    """Every weight of our model with its transformers name(s): the one mapping export and import share."""
    pairs = []
    if family == "gpt2":
        suffixes = (".weight", ".bias") if cfg.bias else (".weight",)
        pairs += [WeightPair("wte.weight", ("transformer.wte.weight",)),
                  WeightPair("wpe.weight", ("transformer.wpe.weight",))]
        pairs += [WeightPair("norm_f" + s, ("transformer.ln_f" + s,)) for s in suffixes]
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for src, dst, is_linear in (("norm1", "ln_1", False), ("norm2", "ln_2", False),
                                        ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                                        ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
                pairs += [WeightPair(ours + src + s, (theirs + dst + s,), is_linear and s == ".weight")
                          for s in suffixes]
    else:
        pairs += [WeightPair("wte.weight", ("model.embed_tokens.weight",)),
                  WeightPair("norm_f.weight", ("model.norm.weight",))]
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            attn, mlp = theirs + "self_attn.", theirs + "mlp."
            pairs += [WeightPair(ours + "norm1.weight", (theirs + "input_layernorm.weight",)),
                      WeightPair(ours + "norm2.weight", (theirs + "post_attention_layernorm.weight",)),
                      WeightPair(ours + "attn.qkv.weight", tuple(attn + p + "_proj.weight" for p in "qkv")),
                      WeightPair(ours + "attn.proj.weight", (attn + "o_proj.weight",)),
                      WeightPair(ours + "mlp.up.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight")),
                      WeightPair(ours + "mlp.down.weight", (mlp + "down_proj.weight",))]
    if not cfg.tie_embeddings:
        pairs.append(WeightPair("lm_head.weight", ("lm_head.weight",)))
    return pairs


# -- export ---------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, family: str, eod: int):
    """The transformers config of our model (the inverse of ``model_config_of``)."""
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.hidden,
                          activation_function="gelu" if cfg.mlp == MLP.gelu_exact else "gelu_new",
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
                          tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eod, eos_token_id=eod)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                       max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
                       bos_token_id=eod, eos_token_id=eod)


def to_hf_weights(pairs: list[WeightPair], sd: dict[str, torch.Tensor],
                  shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Our weights by transformers names; ``shapes`` (the transformers model's) give the split sizes, and a tensor
    of theirs we do not have (GPT-2's biases of a model trained without) is zeros."""
    out = {}
    for pair in pairs:
        weight = sd[pair.ours].t() if pair.transpose else sd[pair.ours]
        parts = weight.split([shapes[name][0] for name in pair.theirs], dim=0)
        out.update({name: part.contiguous() for name, part in zip(pair.theirs, parts, strict=True)})
    for name, shape in shapes.items():
        if name not in out and name.endswith(".bias"):
            out[name] = torch.zeros(shape)
    return out


def is_hf_folder(folder: Path) -> bool:
    """A transformers model folder: a config.json that names a ``model_type``."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except ValueError:
        return False


def model_config_of(hf: Any, folder: Path) -> ModelConfig:
    """Our ModelConfig for a transformers config of the GPT-2 or Llama family (block_size = its context); anything
    our GPT cannot compute the same way is refused in one line naming the field."""
    where = f"{folder / 'config.json'}"
    if hf.model_type == "gpt2":
        problems = _gpt2_problems(hf)
        context = hf.n_positions
        fields = dict(n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, mlp_hidden=hf.n_inner or 0,
                      norm=Norm.layernorm, norm_eps=hf.layer_norm_epsilon,
                      mlp=GPT2_GELU.get(hf.activation_function, MLP.gelu), pos=Positions.learned,
                      bias=True)
    elif hf.model_type in LLAMA_TYPES:
        problems = _llama_problems(hf)
        context = hf.max_position_embeddings
        fields = dict(n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                      n_kv_head=hf.num_key_value_heads or hf.num_attention_heads, n_embd=hf.hidden_size,
                      mlp_hidden=hf.intermediate_size, norm=Norm.rmsnorm, norm_eps=hf.rms_norm_eps, mlp=MLP.swiglu,
                      pos=Positions.rope, rope_theta=float(_rope_parameters(hf).get("rope_theta", 10000.0)),
                      bias=False)
    else:
        raise UserError(f"{where}: model_type={hf.model_type} is not supported; llmtrain imports the GPT-2 "
                        f"(gpt2) and Llama ({', '.join(LLAMA_TYPES)}) families")
    if problems:
        raise UserError(f"{where}: {'; '.join(problems)}")
    return ModelConfig(name=folder.name, arch=Arch.gpt, vocab_size=hf.vocab_size, block_size=context,
                       tie_embeddings=bool(hf.tie_word_embeddings), **fields)


def _gpt2_problems(hf: Any) -> list[str]:
    problems = []
    if hf.activation_function not in GPT2_GELU:
        problems.append(f"activation_function={hf.activation_function} is not supported (llmtrain computes "
                        f"{', '.join(GPT2_GELU)})")
    if not hf.scale_attn_weights:
        problems.append("scale_attn_weights=false is not supported (llmtrain scales attention by 1/sqrt(head size))")
    if hf.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=true is not supported")
    if getattr(hf, "add_cross_attention", False):
        problems.append("add_cross_attention=true is not supported (a decoder-only model has no cross-attention)")
    return problems


def _rope_parameters(hf: Any) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in ``rope_parameters``; 4.x in ``rope_theta`` and ``rope_scaling``."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:
        params = {"rope_theta": getattr(hf, "rope_theta", 10000.0), **(getattr(hf, "rope_scaling", None) or {})}
    return params


def _llama_problems(hf: Any) -> list[str]:
    problems = []
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act={hf.hidden_act} is not supported (llmtrain's SwiGLU gates with silu)")
    rope_type = _rope_parameters(hf).get("rope_type", _rope_parameters(hf).get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_scaling type={rope_type} is not supported (llmtrain computes plain RoPE)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim and head_dim * hf.num_attention_heads != hf.hidden_size:
        problems.append(f"head_dim={head_dim} is not hidden_size / num_attention_heads "
                        f"= {hf.hidden_size // hf.num_attention_heads}")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(hf, name, False):
            problems.append(f"{name}=true is not supported (llmtrain's biases are all or none, and Llama's "
                            "RMSNorm has none)")
    if getattr(hf, "pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={hf.pretraining_tp} is not supported")
    if getattr(hf, "sliding_window", None):
        problems.append(f"sliding_window={hf.sliding_window} is not supported (llmtrain attends to the whole block)")
    return problems


def from_hf_weights(pairs: list[WeightPair], theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights from transformers ones: the inverse of ``to_hf_weights``."""
    shapes = {name: tuple(tensor.shape) for name, tensor in theirs.items()}

    def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return theirs[name][index]

    return {pair.ours: rows_of_pair(pair, shapes, read, 0, our_shape(pair, shapes)[0]) for pair in pairs}


def our_shape(pair: WeightPair, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The shape of our tensor ``pair.ours``, from the shapes of the transformers tensors it is made of."""
    if pair.transpose:
        rows, cols = shapes[pair.theirs[0]]
        return cols, rows
    first = tuple(shapes[pair.theirs[0]])
    return sum(shapes[name][0] for name in pair.theirs), *first[1:]


def rows_of_pair(pair: WeightPair, shapes: Mapping[str, Sequence[int]],
                 read: Callable[[str, tuple[slice, ...]], torch.Tensor], r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of our tensor ``pair.ours`` as a new contiguous tensor, made of the parts of its transformers
    tensors that hold them: ``read(name, index)`` is ``their_tensor[index]`` (a tensor, or a slice read from a file).
    Of GPT-2's transposed Conv1D weight that is columns ``r0:r1``; of a fused weight (Llama's q/k/v, gate/up) the
    rows of each piece that overlap ``r0:r1``."""
    if pair.transpose:
        (name,) = pair.theirs
        return read(name, (slice(None), slice(r0, r1))).t().contiguous()
    parts, start = [], 0
    for name in pair.theirs:
        height = shapes[name][0]
        lo, hi = max(r0, start), min(r1, start + height)
        if lo < hi:
            parts.append(read(name, (slice(lo - start, hi - start),)))
        start += height
    return torch.cat(parts or [read(pair.theirs[0], (slice(0, 0),))], dim=0)  # a copy even of one part


def require_transformers(what: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs transformers: pip install 'llmtrain[hf]'") from None

