"""Process-group / launcher environment and the DeepSpeed wrapping (the only distributed code)."""
