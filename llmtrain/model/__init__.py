"""Model architectures (plain nn.Modules; no distributed code), built from a ``ModelConfig`` by ``build_model``."""

from torch import nn

from llmtrain.config import Arch, ModelConfig
from llmtrain.model.gpt import GPT
from llmtrain.model.lstm import LSTMLM

ARCHITECTURES: dict[Arch, type[nn.Module]] = {Arch.gpt: GPT, Arch.lstm: LSTMLM}


def build_model(cfg: ModelConfig, activation_checkpointing: bool = False) -> nn.Module:
    """The model of ``cfg.arch``; both share forward(idx, targets, cache), num_params, flops_per_token, new_cache.
    ``activation_checkpointing``: recompute each block's activations in the backward pass (memory for compute)."""
    model = ARCHITECTURES[cfg.arch](cfg)
    model.activation_checkpointing = activation_checkpointing
    return model


__all__ = ["ARCHITECTURES", "GPT", "LSTMLM", "build_model"]
