"""Baseline language models the GPT must beat."""
