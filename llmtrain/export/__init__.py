"""Output formats for other tools: a Hugging Face transformers folder and its tokenizer files."""
