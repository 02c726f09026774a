"""llmtrain <-> Hugging Face ``transformers``: GPT-2 for learned-positions / LayerNorm / GELU models, Llama for
RoPE / RMSNorm / SwiGLU ones (grouped-query attention included), and for their mixtures of experts Mixtral or
Qwen2-MoE. Both directions are pure renaming and reshaping of the weights through one table, ``weight_pairs``:

- GPT-2 stores its projections as ``Conv1D`` (in, out), so our (out, in) linear weights are transposed, and it
  always has biases and LayerNorm biases: models trained without them are exported with zeros (the same function).
- Llama splits our fused ``qkv`` into q/k/v projections and our fused SwiGLU ``up`` (gate rows first) into
  gate/up projections; both rotate the same channel halves in RoPE, so no permutation is needed.
- A mixture of experts (``model.n_experts``) of the Llama kind is Mixtral when every block is sparse, without
  shared experts, its router renormalizing the top k (as Mixtral's always does); any other is Qwen2-MoE
  (``decoder_sparse_step`` = ``model.moe_every``, ``norm_topk_prob`` = ``model.router_renormalize``, no q/k/v
  biases). Qwen2-MoE has one shared expert behind a sigmoid gate: our n shared experts are it at n x the width, its
  gate zero (sigmoid(0) = 1/2) and its ``down_proj`` stored doubled; without shared experts it is 0 wide. Qwen3-MoE
  is not used: its attention RMS-normalizes each head's queries and keys (``q_norm``/``k_norm``), which ours does
  not, and a norm of weight 1 is no identity. transformers computes every route: a model trained with
  ``model.capacity_factor`` is exported as llmtrain computes it dropless.

The table names the tensors as transformers stores them (``save_pretrained``, the hub's checkpoints: one tensor per
expert, Mixtral's ``block_sparse_moe.experts.e.w1/w3/w2``); a loaded transformers 5 model holds a sparse block's
experts stacked (``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) and Mixtral's block as ``mlp``,
which each pair's ``loaded`` and ``expert`` name. A transformers config maps onto ``ModelConfig``
(``model_config_of``); a setting llmtrain's GPT cannot represent is refused in one line naming the field. Loading a
folder is ``llmtrain.run.trained.load_hf`` (whole, through transformers) or ``open_trained`` (rows read from its
safetensors when needed, ``rows_of_pair``), writing one ``llmtrain.export.hf.save_hf``. ``transformers`` is an
optional extra (``pip install 'llmtrain[hf]'``).
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
MOE_TYPES = ("mixtral", "qwen2_moe")
"""``model_type`` values of the mixtures of experts llmtrain reads and writes (each is also our family's name)."""
_QK_NORM = "its attention RMS-normalizes each head's queries and keys (q_norm, k_norm), which llmtrain's does not"
NOT_OURS = {"qwen3_moe": _QK_NORM, "qwen3": _QK_NORM}
"""Families that look like ours but compute something else: why each is refused."""
GPT2_GELU = {"gelu_new": MLP.gelu, "gelu_pytorch_tanh": MLP.gelu, "gelu": MLP.gelu_exact}
"""GPT-2 activation names and our MLP that computes each: GELU's tanh approximation (GPT-2's own) or exact GELU."""


@dataclass(frozen=True)
class WeightPair:
    """One of our tensors and the transformers tensor(s) it is made of (several: stacked along dim 0)."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    """GPT-2's Conv1D stores (in, out), the transpose of our nn.Linear weight."""
    scale: float = 1.0
    """Theirs = ours x scale (a power of two: exact both ways). Qwen2-MoE's shared ``down_proj`` is stored doubled,
    against the 1/2 of its zero gate."""
    loaded: str = ""
    """Its name in a model transformers has loaded, where that is not ``theirs``: transformers 5 holds a sparse
    block's experts stacked and renames Mixtral's ``block_sparse_moe`` to ``mlp``; '' = the stored name(s)."""
    expert: int = -1
    """Our tensor is ``loaded[expert]`` (a stacked expert: its gate and up rows, or its down_proj); -1 = all of it."""


def hf_family(cfg: ModelConfig) -> str:
    """'gpt2', 'llama', 'mixtral' or 'qwen2_moe', or a UserError saying why the architecture has no transformers
    equivalent."""
    if cfg.arch != Arch.gpt:
        raise UserError(f"model arch={cfg.arch.value} has no transformers equivalent; use format=safetensors")
    if cfg.sparse_layers:
        return _moe_family(cfg)
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


def _moe_family(cfg: ModelConfig) -> str:
    llama_kind = cfg.pos == Positions.rope and cfg.norm == Norm.rmsnorm and cfg.mlp == MLP.swiglu and not cfg.bias
    if not llama_kind:
        raise UserError(f"a mixture of experts with pos={cfg.pos.value}, norm={cfg.norm.value}, mlp={cfg.mlp.value}, "
                        f"bias={str(cfg.bias).lower()} has no transformers equivalent (Mixtral and Qwen2-MoE are "
                        "pos=rope, norm=rmsnorm, mlp=swiglu, bias=false); use format=safetensors")
    every_block = len(cfg.sparse_layers) == cfg.n_layer
    if every_block and not cfg.n_shared_experts and cfg.router_renormalize:
        return "mixtral"
    return "qwen2_moe"


def hf_family_of(hf: Any) -> str:
    """Our family name of a transformers config that ``model_config_of`` accepts (the names its weights have)."""
    return "llama" if hf.model_type in LLAMA_TYPES else hf.model_type


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
                      WeightPair(ours + "attn.proj.weight", (attn + "o_proj.weight",))]
            if cfg.is_sparse(i):
                pairs += _expert_pairs(cfg, family, i)
            else:  # Mixtral's and Qwen2-MoE's dense feed-forwards are Llama's
                pairs += [WeightPair(ours + "mlp.up.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight")),
                          WeightPair(ours + "mlp.down.weight", (mlp + "down_proj.weight",))]
    if not cfg.tie_embeddings:
        pairs.append(WeightPair("lm_head.weight", ("lm_head.weight",)))
    return pairs


def _expert_pairs(cfg: ModelConfig, family: str, i: int) -> list[WeightPair]:
    """Sparse block ``i``: the router, each expert (stored one by one, loaded stacked) and the shared experts."""
    ours, loaded = f"blocks.{i}.mlp.", f"model.layers.{i}.mlp."
    if family == "mixtral":
        stored, gate, up, down = f"model.layers.{i}.block_sparse_moe.", "w1", "w3", "w2"
    else:
        stored, gate, up, down = loaded, "gate_proj", "up_proj", "down_proj"
    router = loaded + "gate.weight"
    pairs = [WeightPair(ours + "router.weight", (stored + "gate.weight",), loaded=router if stored != loaded else "")]
    for e in range(cfg.n_experts):
        expert = f"{stored}experts.{e}."
        pairs += [WeightPair(f"{ours}experts.{e}.up.weight", (f"{expert}{gate}.weight", f"{expert}{up}.weight"),
                             loaded=loaded + "experts.gate_up_proj", expert=e),
                  WeightPair(f"{ours}experts.{e}.down.weight", (f"{expert}{down}.weight",),
                             loaded=loaded + "experts.down_proj", expert=e)]
    if cfg.n_shared_experts:
        shared = loaded + "shared_expert."
        pairs += [WeightPair(ours + "shared.up.weight", (shared + "gate_proj.weight", shared + "up_proj.weight")),
                  WeightPair(ours + "shared.down.weight", (shared + "down_proj.weight",), scale=2.0)]
    return pairs


def fixed_weights(cfg: ModelConfig, family: str) -> dict[str, float]:
    """Transformers tensors that none of ours make, and the value each holds in a model llmtrain computes: Qwen2-MoE's
    shared-expert gate (zero, see the module's docstring) and, without shared experts, its 0-wide shared expert.
    Export writes them; import requires them."""
    if family != "qwen2_moe":
        return {}
    fixed = {}
    for i in cfg.sparse_layers:
        mlp = f"model.layers.{i}.mlp."
        fixed[mlp + "shared_expert_gate.weight"] = 0.0
        if not cfg.n_shared_experts:
            fixed.update(dict.fromkeys((f"{mlp}shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")), 0.0))
    return fixed


def fixed_problems(fixed: Mapping[str, float], read: Callable[[str], torch.Tensor]) -> list[str]:
    """The tensors of ``fixed`` (``fixed_weights``) that do not hold their value; ``read(name)`` is the tensor."""
    return [f"{name} is not all {value:g} (llmtrain computes Qwen2-MoE's shared expert ungated: a zero gate, "
            "sigmoid(0) = 1/2, against its doubled down_proj)"
            for name, value in fixed.items() if not bool((read(name) == value).all())]


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
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
                  max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eod, eos_token_id=eod)
    if family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=cfg.expert_hidden, head_dim=cfg.head_dim, sliding_window=None,
                             num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                             router_jitter_noise=0.0, **common)
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(intermediate_size=cfg.hidden, moe_intermediate_size=cfg.expert_hidden,
                              shared_expert_intermediate_size=cfg.n_shared_experts * cfg.expert_hidden,
                              num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                              decoder_sparse_step=cfg.moe_every, mlp_only_layers=[],
                              norm_topk_prob=cfg.router_renormalize, qkv_bias=False, use_sliding_window=False,
                              **common)
    from transformers import LlamaConfig

    return LlamaConfig(intermediate_size=cfg.hidden, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False,
                       **common)


def to_hf_weights(pairs: list[WeightPair], sd: Mapping[str, torch.Tensor], shapes: dict[str, torch.Size],
                  fixed: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Our weights by the names of a transformers model (``shapes``: its state dict's, which give the split sizes,
    and say whether it holds a pair's ``loaded`` tensor); the ``fixed`` tensors hold their value, and a tensor of
    theirs we do not have (GPT-2's biases of a model trained without) is zeros."""
    out = {}
    for pair in pairs:
        weight = sd[pair.ours].t() if pair.transpose else sd[pair.ours]
        if pair.scale != 1:
            weight = weight * pair.scale
        if pair.loaded in shapes:
            if pair.expert < 0:
                out[pair.loaded] = weight.contiguous()
            else:  # NaN until every expert is in: a gap would show in any output
                out.setdefault(pair.loaded, torch.full(shapes[pair.loaded], float("nan"), dtype=weight.dtype))
                out[pair.loaded][pair.expert] = weight
            continue
        parts = weight.split([shapes[name][0] for name in pair.theirs], dim=0)
        out.update({name: part.contiguous() for name, part in zip(pair.theirs, parts, strict=True)})
    out.update({name: torch.full(shapes[name], value) for name, value in (fixed or {}).items()})
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
    """Our ModelConfig for a transformers config of the GPT-2 or Llama family, or a Mixtral or Qwen2-MoE mixture of
    experts (block_size = its context); anything our GPT cannot compute the same way is refused in one line naming
    the field."""
    where = f"{folder / 'config.json'}"
    if hf.model_type == "gpt2":
        problems = _gpt2_problems(hf)
        context = hf.n_positions
        fields = dict(n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, mlp_hidden=hf.n_inner or 0,
                      norm=Norm.layernorm, norm_eps=hf.layer_norm_epsilon,
                      mlp=GPT2_GELU.get(hf.activation_function, MLP.gelu), pos=Positions.learned,
                      bias=True)
    elif hf.model_type in LLAMA_TYPES + MOE_TYPES:
        problems = _llama_problems(hf) + (_moe_problems(hf) if hf.model_type in MOE_TYPES else [])
        context = hf.max_position_embeddings
        fields = dict(n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                      n_kv_head=hf.num_key_value_heads or hf.num_attention_heads, n_embd=hf.hidden_size,
                      mlp_hidden=hf.intermediate_size, norm=Norm.rmsnorm, norm_eps=hf.rms_norm_eps, mlp=MLP.swiglu,
                      pos=Positions.rope, rope_theta=float(_rope_parameters(hf).get("rope_theta", 10000.0)),
                      bias=False)
    elif hf.model_type in NOT_OURS:
        raise UserError(f"{where}: model_type={hf.model_type} is not supported: {NOT_OURS[hf.model_type]}")
    else:
        raise UserError(f"{where}: model_type={hf.model_type} is not supported; llmtrain imports the GPT-2 "
                        f"(gpt2) and Llama ({', '.join(LLAMA_TYPES)}) families and the mixtures of experts "
                        f"{', '.join(MOE_TYPES)}")
    if problems:
        raise UserError(f"{where}: {'; '.join(problems)}")
    if hf.model_type in MOE_TYPES:
        fields.update(_moe_fields(hf))
    return ModelConfig(name=folder.name, arch=Arch.gpt, vocab_size=hf.vocab_size, block_size=context,
                       tie_embeddings=bool(hf.tie_word_embeddings), **fields)


def _moe_fields(hf: Any) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral or Qwen2-MoE config (dropless: transformers computes every route)."""
    if hf.model_type == "mixtral":
        return dict(n_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok, moe_every=1,
                    router_renormalize=True, moe_hidden=hf.intermediate_size, capacity_factor=0.0)
    width = hf.moe_intermediate_size
    return dict(n_experts=hf.num_experts, experts_per_token=hf.num_experts_per_tok, moe_every=hf.decoder_sparse_step,
                router_renormalize=bool(hf.norm_topk_prob), moe_hidden=width, capacity_factor=0.0,
                n_shared_experts=hf.shared_expert_intermediate_size // width if hf.num_experts else 0)


def _moe_problems(hf: Any) -> list[str]:
    if hf.model_type == "mixtral":
        jitter = getattr(hf, "router_jitter_noise", 0.0)
        return [f"router_jitter_noise={jitter} is not supported (llmtrain's router has no jitter)"] if jitter else []
    problems = []
    if getattr(hf, "qkv_bias", True):  # transformers 4 has no setting: its Qwen2-MoE always has q/k/v biases
        problems.append("qkv_bias=true is not supported (llmtrain's Llama-style attention has no biases)")
    if not hf.num_experts:
        return problems
    if hf.decoder_sparse_step < 1:
        return [*problems, f"decoder_sparse_step={hf.decoder_sparse_step} must be at least 1"]
    sparse = [i for i in range(hf.num_hidden_layers) if (i + 1) % hf.decoder_sparse_step == 0]
    dense_anyway = sorted(set(hf.mlp_only_layers or []) & set(sparse))
    if dense_anyway:
        problems.append(f"mlp_only_layers={dense_anyway} is not supported (llmtrain's sparse blocks are every "
                        f"decoder_sparse_step-th, model.moe_every)")
    width, shared = hf.moe_intermediate_size, hf.shared_expert_intermediate_size
    if not width or shared % width:
        problems.append(f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size="
                        f"{width} (llmtrain's shared experts are model.n_shared_experts of the experts' width)")
    return problems


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


def from_hf_weights(pairs: list[WeightPair], theirs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights from transformers ones, stored or loaded (where ``theirs`` holds a pair's ``loaded`` tensor): the
    inverse of ``to_hf_weights``."""
    shapes = {name: tuple(tensor.shape) for name, tensor in theirs.items()}

    def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return theirs[name][index]

    def ours(pair: WeightPair) -> torch.Tensor:
        if pair.loaded in theirs:
            loaded = theirs[pair.loaded]
            return _unscaled(pair, (loaded if pair.expert < 0 else loaded[pair.expert]).clone())
        return rows_of_pair(pair, shapes, read, 0, our_shape(pair, shapes)[0])

    return {pair.ours: ours(pair) for pair in pairs}


def _unscaled(pair: WeightPair, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if pair.scale == 1 else tensor / pair.scale


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
        return _unscaled(pair, read(name, (slice(None), slice(r0, r1))).t().contiguous())
    parts, start = [], 0
    for name in pair.theirs:
        height = shapes[name][0]
        lo, hi = max(r0, start), min(r1, start + height)
        if lo < hi:
            parts.append(read(name, (slice(lo - start, hi - start),)))
        start += height
    return _unscaled(pair, torch.cat(parts or [read(pair.theirs[0], (slice(0, 0),))], dim=0))  # a copy of one part


def require_transformers(what: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs transformers: pip install 'llmtrain[hf]'") from None

