"""The synchronous mode: a GPT trained under DeepSpeed ZeRO (its trainer, and its checkpoint tensor files)."""
