"""Shared fixtures: a small prepared dataset made from the embedded default corpus (the stdlib's .py files)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmtrain.config import DataConfig, Source

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def small_data_config(folder: Path, **overrides) -> DataConfig:
    """150 stdlib documents, a 1024-token vocabulary and 50k-token shards (so windows span several shards)."""
    fields = dict(source=Source.stdlib, dir=str(folder), max_documents=150, vocab_size=1024,
                  tokenizer_sample_documents=100, shard_tokens=50_000, num_proc=1, val_fraction=0.05)
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory) -> Path:
    from llmtrain.data.prepare import prepare

    folder = tmp_path_factory.mktemp("prepared") / "small"
    prepare(small_data_config(folder))
    return folder


@pytest.fixture(scope="session")
def prepared_second(prepared_small, tmp_path_factory) -> Path:
    """Another corpus (other stdlib documents, another split seed) prepared with ``prepared_small``'s tokenizer:
    the second source of a mix."""
    from llmtrain.data.prepare import prepare
    from llmtrain.data.reader import PreparedData

    folder = tmp_path_factory.mktemp("prepared") / "second"
    prepare(small_data_config(folder, max_documents=60, seed=99,
                              tokenizer_path=str(PreparedData(prepared_small).tokenizer_file)))
    return folder


def run_cli(*args: str, timeout: float = 600, **kwargs):
    """Run a console script of this venv; returns the CompletedProcess (text mode)."""
    import subprocess

    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          cwd=kwargs.pop("cwd", REPO), **kwargs)
