"""Corpus loading, sentencepiece tokenizer, packing into memory-mapped shards, and the per-rank reader."""
