"""Export to a Hugging Face ``transformers`` folder (GPT-2 or Llama family, or a Mixtral or Qwen2-MoE mixture of
experts) that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load; the weights are renamed and reshaped through
``llmtrain.hf_mapping``."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from llmtrain.data.tokenizer import JsonTokenizer
from llmtrain.dtypes import torch_dtype
from llmtrain.export.hf_tokenizer import save_hf_tokenizer, save_json_tokenizer
from llmtrain.hf_mapping import fixed_weights, hf_config, hf_family, require_transformers, to_hf_weights, weight_pairs
from llmtrain.run.trained import TrainedModel

log = logging.getLogger("llmtrain")


def save_hf(trained: TrainedModel, out: str | Path, dtype: str = "fp32") -> str:
    """Write a folder ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load; returns the family."""
    require_transformers("format=hf")
    from transformers import AutoModelForCausalLM

    cfg = trained.model_cfg
    family = hf_family(cfg)
    if cfg.sparse_layers and cfg.capacity_factor:
        log.warning("model.capacity_factor=%g drops the routes past an expert's capacity; transformers computes "
                    "every route (llmtrain's model.capacity_factor=0)", cfg.capacity_factor)
    with warnings.catch_warnings():  # a Qwen2-MoE without shared experts has a 0-wide one: torch warns of it
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        model = AutoModelForCausalLM.from_config(hf_config(cfg, family, trained.tokenizer.eod_id))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    weights = to_hf_weights(weight_pairs(cfg, family), trained.state_dict, shapes, fixed_weights(cfg, family))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)  # the mapping covers every weight
    model = model.to(torch_dtype(dtype)).eval()
    out = Path(out)
    model.save_pretrained(out)
    tokenizer_file = out / trained.tokenizer.file_name
    trained.tokenizer.save(tokenizer_file)
    if isinstance(trained.tokenizer, JsonTokenizer):
        save_json_tokenizer(trained.tokenizer, out)
    else:
        save_hf_tokenizer(tokenizer_file, out)
    return family
