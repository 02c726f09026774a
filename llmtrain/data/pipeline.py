"""The steps of a non-streaming prepare: split the documents, get the tokenizer, tokenize, pack into shards.

The one-process prepare (``prepare``) runs them in turn; its task-by-task form (``tasks``) runs the same steps
split over a plan and K tasks, so both write the same bytes. ``write_documents`` is also the packing step of the
streaming prepare (``streaming``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from llmtrain.config import DataConfig
from llmtrain.data.shards import ShardWriter, token_dtype
from llmtrain.data.sources import TEXT_COLUMN
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def split_documents(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: True for validation documents. Deterministic from the seed; both splits non-empty."""
    if num_documents < 2:
        raise UserError(f"the corpus has {num_documents} document(s); at least 2 are needed for a train/val split")
    rng = np.random.default_rng(seed)
    num_val = min(num_documents - 1, max(1, round(num_documents * val_fraction)))
    is_val = np.zeros(num_documents, dtype=bool)
    is_val[rng.choice(num_documents, size=num_val, replace=False)] = True
    return is_val


def load_or_train_tokenizer(cfg: DataConfig, ds: datasets.Dataset, is_val: np.ndarray) -> Tokenizer:
    """``data.tokenizer_path`` loaded, or a tokenizer trained on a seeded sample of the training documents."""
    if cfg.tokenizer_path:
        tokenizer = Tokenizer.load(cfg.tokenizer_path)
        log.info("reusing tokenizer %s (vocab %d)", cfg.tokenizer_path, tokenizer.vocab_size)
        return tokenizer
    train_docs = np.flatnonzero(~is_val)
    rng = np.random.default_rng(cfg.seed + 1)
    sample = np.sort(rng.choice(train_docs, size=min(len(train_docs), cfg.tokenizer_sample_documents), replace=False))
    texts = ds.select(sample)[TEXT_COLUMN]
    log.info("training a %s tokenizer (vocab %d) on %d documents", cfg.tokenizer_type.value, cfg.vocab_size, len(texts))
    return Tokenizer.train(texts, cfg.vocab_size, cfg.tokenizer_type.value, num_threads=cfg.num_proc)


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _encode_batch(batch: dict[str, list[str]], model_path: str) -> dict[str, list[np.ndarray]]:
    tokenizer = _WORKER_TOKENIZERS.get(model_path)
    if tokenizer is None:  # once per worker process
        tokenizer = _WORKER_TOKENIZERS[model_path] = Tokenizer.load(model_path)
    dtype = token_dtype(tokenizer.vocab_size)
    return {"ids": [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(batch[TEXT_COLUMN])]}


def tokenize(ds: datasets.Dataset, model_path: Path, num_proc: int,
             cache_file: Path | None = None) -> datasets.Dataset:
    """Encode every document with ``Dataset.map(batched=True, num_proc=...)``: one ``ids`` column.

    ``cache_file``: where the result's Arrow file goes (default: beside ``ds``'s own cache files)."""
    num_proc = max(1, min(num_proc, len(ds)))
    return ds.map(
        _encode_batch,
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        fn_kwargs={"model_path": str(model_path)},
        new_fingerprint=f"llmtrain-tokenize-{os.getpid()}-{time.time_ns()}",
        cache_file_name=str(cache_file) if cache_file is not None else None,
        desc="tokenize",
    )


def pack(ids: datasets.Dataset, is_val: np.ndarray, tokenizer: Tokenizer, folder: Path,
         shard_tokens: int) -> dict[str, dict[str, Any]]:
    """Append each document's ids plus the end-of-document id to its split's shards, streaming by arrow batch."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {name: ShardWriter(folder, name, dtype, shard_tokens) for name in ("train", "val")}
    row = 0
    # prepare runs in one process (the CLI, or rank 0 of a training job), so the bar needs no rank check
    bar = tqdm(total=len(ids), desc="pack", unit="doc", disable=not datasets.is_progress_bar_enabled())
    for batch in ids.data.to_batches(max_chunksize=4096):
        column = batch.column(0)
        offsets = column.offsets.to_numpy()
        offsets = offsets - offsets[0]
        values = column.flatten().to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        write_documents(writers, values, lengths, is_val[row: row + len(column)], tokenizer.eod_id)
        row += len(column)
        bar.update(len(column))
    bar.close()
    for writer in writers.values():
        writer.close()
    return {name: writer.summary() for name, writer in writers.items()}


def write_documents(writers: dict[str, ShardWriter], values: np.ndarray, lengths: np.ndarray, is_val: np.ndarray,
                    eod_id: int) -> None:
    """Append each document (``lengths`` of the flat ``values``), followed by ``eod_id``, to its split's shards."""
    for name, mask in (("train", ~is_val), ("val", is_val)):
        if mask.any():
            writers[name].write(with_eod(values, lengths, mask, eod_id, writers[name].dtype), int(mask.sum()))


def with_eod(values: np.ndarray, lengths: np.ndarray, keep: np.ndarray, eod_id: int, dtype: np.dtype) -> np.ndarray:
    """The kept documents' tokens, each followed by ``eod_id``, as one flat array."""
    kept_lengths = lengths[keep]
    tokens = values[np.repeat(keep, lengths)]
    out = np.full(len(tokens) + len(kept_lengths), eod_id, dtype=dtype)
    # Token j of kept document d lands j + d places further on: one EOD precedes it per earlier document.
    out[np.arange(len(tokens)) + np.repeat(np.arange(len(kept_lengths)), kept_lengths)] = tokens
    return out
