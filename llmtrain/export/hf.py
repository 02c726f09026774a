"""Export to a Hugging Face ``transformers`` folder (GPT-2 or Llama family) that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load; the weights are renamed and reshaped through ``llmtrain.hf_mapping``."""

from __future__ import annotations

from pathlib import Path

from llmtrain.data.tokenizer import JsonTokenizer
from llmtrain.dtypes import torch_dtype
from llmtrain.export.hf_tokenizer import save_hf_tokenizer, save_json_tokenizer
from llmtrain.hf_mapping import hf_config, hf_family, require_transformers, to_hf_weights, weight_pairs
from llmtrain.run.trained import TrainedModel


def save_hf(trained: TrainedModel, out: str | Path, dtype: str = "fp32") -> str:
    """Write a folder ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load; returns the family."""
    require_transformers("format=hf")
    from transformers import AutoModelForCausalLM

    cfg = trained.model_cfg
    family = hf_family(cfg)
    model = AutoModelForCausalLM.from_config(hf_config(cfg, family, trained.tokenizer.eod_id))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    weights = to_hf_weights(weight_pairs(cfg, family), trained.state_dict, shapes)
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
