"""llmtrain: train GPT-style language models from one CPU process to many GPU nodes."""

__version__ = "0.1.0"
