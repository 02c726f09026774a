"""Model architectures (plain nn.Modules; no distributed code)."""

from llmtrain.model.gpt import GPT

__all__ = ["GPT"]
