"""``data.streaming=true``: prepare a corpus as a stream, in memory that does not grow with its size.

    llmtrain-prepare data=text 'data.paths=[corpus/*.jsonl]' data.streaming=true data.dir=data/big

The documents come from `datasets`' IterableDatasets (``sources.stream_corpus``: the hub, or local
jsonl/parquet/plain text, in the order a non-streaming prepare reads them); no corpus copy or Arrow cache is
written. What differs from the non-streaming prepare, because a stream has no length until its end:

- The train/val split is decided per document: document ``k`` is held out when ``keyed_uniform(seed, k) <
  data.val_fraction`` (``data.order``), so the split is deterministic but not the non-streaming one, and the
  number of validation documents is about, not exactly, ``val_fraction`` of them. A split that comes out empty
  is refused in one line (raise ``data.val_fraction`` or add documents).
- The tokenizer is trained on the first ``data.tokenizer_sample_documents`` training documents of the stream
  (the non-streaming prepare samples them from the whole corpus): a first, short pass over the stream's head.
- Documents are encoded a batch at a time by sentencepiece with ``data.num_proc`` threads (not processes).
- A corpus that is mostly not UTF-8 text (``sources.check_mostly_text``) is refused only at the end of the stream,
  when every file has been read once.

Memory is bounded by one batch of documents (``sources.STREAM_BATCH``, and a whole plain-text file unless
``data.text_unit=line``) plus the tokenizer sample. Streaming runs in one process (``data.num_tasks=1``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from llmtrain.config import DataConfig
from llmtrain.data.order import keyed_uniform
from llmtrain.data.pipeline import write_documents
from llmtrain.data.shards import SPLITS, ShardWriter, token_dtype, write_meta
from llmtrain.data.sources import DocumentStream, check_mostly_text, stream_corpus
from llmtrain.data.staging import PrepareReport, Stopwatch, build_meta, check_target, publish, staging
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def prepare_streaming(cfg: DataConfig) -> PrepareReport:
    """Prepare ``cfg.dir`` from a stream of the configured source; returns what was done."""
    target = Path(cfg.dir).expanduser().resolve()
    existing = check_target(target, cfg)
    if existing is not None:
        log.info("%s is already prepared with this config; nothing to do", target)
        return PrepareReport(target, existing, skipped=True)
    clock = Stopwatch()
    with staging(target) as stage:
        stream = stream_corpus(cfg, stage / "scratch")
        with clock.stage("tokenizer"):
            tokenizer = _stream_tokenizer(cfg, stream)
            tokenizer.save(stage / tokenizer.file_name)
        with clock.stage("tokenize+pack"):
            splits = pack_stream(stream, tokenizer, stage, cfg)
        meta = build_meta(cfg, tokenizer, splits, stream.stats)
        shutil.rmtree(stage / "scratch", ignore_errors=True)
        write_meta(stage, meta)
        publish(stage, target)
    report = PrepareReport(target, meta, seconds=clock.seconds)
    mb = stream.stats.bytes / 1e6
    log.info("prepared %s by streaming: %d documents, %.1f MB, %s train + %s val tokens, in %.1f s (%.2f MB/s)",
             target, stream.stats.documents, mb, f"{splits['train']['tokens']:,}", f"{splits['val']['tokens']:,}",
             report.total_seconds, mb / max(report.total_seconds, 1e-9))
    return report


def is_val_document(seed: int, first: int, count: int, val_fraction: float) -> np.ndarray:
    """Boolean mask of documents ``first .. first+count-1`` of a stream: True for validation (per document)."""
    return keyed_uniform((seed,), np.arange(first, first + count)) < val_fraction


def _stream_tokenizer(cfg: DataConfig, stream: DocumentStream) -> Tokenizer:
    """The configured tokenizer, or one trained on the first ``tokenizer_sample_documents`` training documents."""
    if cfg.tokenizer_path:
        tokenizer = Tokenizer.load(cfg.tokenizer_path)
        log.info("reusing tokenizer %s (vocab %d)", cfg.tokenizer_path, tokenizer.vocab_size)
        return tokenizer
    sample: list[str] = []
    seen = 0
    for texts in stream.batches():
        is_val = is_val_document(cfg.seed, seen, len(texts), cfg.val_fraction)
        sample += [t for t, v in zip(texts, is_val, strict=True) if not v]
        seen += len(texts)
        if len(sample) >= cfg.tokenizer_sample_documents:
            break
    sample = sample[: cfg.tokenizer_sample_documents]
    if not any(sample):
        raise UserError(f"the corpus is empty ({seen} documents, no training text) — check data.paths / data.source")
    log.info("training a %s tokenizer (vocab %d) on the first %d training documents of the stream",
             cfg.tokenizer_type.value, cfg.vocab_size, len(sample))
    return Tokenizer.train(sample, cfg.vocab_size, cfg.tokenizer_type.value, num_threads=cfg.num_proc)


def pack_stream(stream: DocumentStream, tokenizer: Tokenizer, folder: Path, cfg: DataConfig) -> dict[str, dict]:
    """Encode the stream a batch at a time and append each document plus the end-of-document id to its split's
    shards; fills ``stream.stats``. Refuses a split that comes out empty."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {name: ShardWriter(folder, name, dtype, cfg.shard_tokens) for name in SPLITS}
    seen = 0
    # prepare runs in one process (the CLI, or rank 0 of a training job), so the bar needs no rank check
    bar = tqdm(desc="tokenize+pack", unit="doc", disable=not datasets.is_progress_bar_enabled())
    for texts in stream.batches(count=True):
        ids = tokenizer.encode_batch(texts, num_threads=cfg.num_proc)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter((i for doc in ids for i in doc), dtype=dtype, count=int(lengths.sum()))
        is_val = is_val_document(cfg.seed, seen, len(texts), cfg.val_fraction)
        write_documents(writers, values, lengths, is_val, tokenizer.eod_id)
        seen += len(texts)
        bar.update(len(texts))
    bar.close()
    for writer in writers.values():
        writer.close()
    # only now are the plain-text files' sizes and validity known: a stream reads each file once, while packing
    check_mostly_text(stream.stats, stream.file_bytes, cfg.allow_invalid_utf8)
    if seen < 2:
        raise UserError(f"the corpus has {seen} document(s); at least 2 are needed for a train/val split")
    for name, writer in writers.items():
        if writer.documents == 0:
            raise UserError(f"streaming put none of the {seen} documents in the {name} split (it is decided per "
                            f"document); raise or lower data.val_fraction={cfg.val_fraction}, or add documents")
    return {name: writer.summary() for name, writer in writers.items()}
