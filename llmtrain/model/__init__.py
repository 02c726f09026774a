"""Model architectures (plain nn.Modules; no distributed code), built from a ``ModelConfig`` by ``build_model``."""

from torch import nn

from llmtrain.config import Arch, ModelConfig
from llmtrain.model.gpt import GPT
from llmtrain.model.lstm import LSTMLM

ARCHITECTURES: dict[Arch, type[nn.Module]] = {Arch.gpt: GPT, Arch.lstm: LSTMLM}


def build_model(cfg: ModelConfig, activation_checkpointing: bool = False, initialize: bool = True) -> nn.Module:
    """The model of ``cfg.arch``; both share forward(idx, targets, cache), num_params, active_params, flops_per_token,
    new_cache.
    ``activation_checkpointing``: recompute each block's activations in the backward pass (memory for compute).
    ``initialize=False`` skips the model's own initial values, for weights that are copied in next."""
    model = ARCHITECTURES[cfg.arch](cfg, initialize)
    model.activation_checkpointing = activation_checkpointing
    return model


__all__ = ["ARCHITECTURES", "GPT", "LSTMLM", "build_model"]
