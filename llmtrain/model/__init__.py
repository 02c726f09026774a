"""Model architectures (plain nn.Modules; no distributed code), built from a ``ModelConfig`` by ``build_model``."""

from torch import nn

from llmtrain.config import Arch, ModelConfig
from llmtrain.model.gpt import GPT
from llmtrain.model.lstm import LSTMLM

ARCHITECTURES: dict[Arch, type[nn.Module]] = {Arch.gpt: GPT, Arch.lstm: LSTMLM}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg.arch``; both share forward(idx, targets, cache), num_params, flops_per_token, new_cache."""
    return ARCHITECTURES[cfg.arch](cfg)


__all__ = ["ARCHITECTURES", "GPT", "LSTMLM", "build_model"]
