"""``llmtrain-prepare``: corpus -> tokenizer (trained, or data.tokenizer_path) -> packed memory-mapped shards.

Everything is written into a staging folder beside ``data.dir`` and moved into place only when complete,
so a killed prepare never leaves a folder that looks finished. Re-running with the same config on a complete
folder does nothing.

This module is the one-process pipeline (``data.task=all``) and the pieces the other two modes reuse:
``llmtrain.data.tasks`` runs it as a plan, K tokenize tasks and a merge (``data.num_tasks``), and
``llmtrain.data.streaming`` tokenizes a stream in bounded memory (``data.streaming=true``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

import llmtrain
from llmtrain.config import DataConfig, to_plain
from llmtrain.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    ShardWriter,
    read_meta,
    token_dtype,
    write_meta,
)
from llmtrain.data.sources import TEXT_COLUMN, CorpusStats, load_corpus
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError, os_reason

log = logging.getLogger("llmtrain")
STAGING_PREFIX = ".partial-"


@dataclass
class PrepareReport:
    """What a prepare did: the written meta (or the existing one) and seconds spent per stage.

    A plan or tokenize task (``data.task=plan|<i>``) reports its own folder and json instead, described by ``note``.
    """

    data_dir: Path
    meta: dict[str, Any]
    skipped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    note: str | None = None

    def line(self) -> str:
        """The one line the CLI prints: the folder and what it holds."""
        return f"{self.data_dir}: {self.note if self.note is not None else describe(self.meta)}"

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


class _Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def prepare(cfg: DataConfig) -> PrepareReport:
    """Prepare ``cfg.dir`` from the configured source (or run the phase ``cfg.task`` of it); returns what was done."""
    # Imported here: both modules build on this one's pieces.
    if cfg.streaming:
        from llmtrain.data.streaming import prepare_streaming

        return prepare_streaming(cfg)
    if cfg.task != "all":
        from llmtrain.data.tasks import run_phase

        return run_phase(cfg)
    target = Path(cfg.dir).expanduser().resolve()
    existing = _check_target(target, cfg)
    if existing is not None:
        log.info("%s is already prepared with this config (%s train tokens); nothing to do",
                 target, f"{existing['splits']['train']['tokens']:,}")
        return PrepareReport(target, existing, skipped=True)
    clock = _Stopwatch()
    with _staging(target) as stage:
        with clock.stage("load"):
            ds, stats = load_corpus(cfg, stage / "scratch")
        is_val = split_documents(len(ds), cfg.val_fraction, cfg.seed)
        with clock.stage("tokenizer"):
            tokenizer = _tokenizer(cfg, ds, is_val)
            tokenizer.save(stage / tokenizer.file_name)
        with clock.stage("tokenize"):
            ids = tokenize(ds, stage / tokenizer.file_name, cfg.num_proc)
        with clock.stage("pack"):
            splits = pack(ids, is_val, tokenizer, stage, cfg.shard_tokens)
        meta = _meta(cfg, tokenizer, splits, stats)
        shutil.rmtree(stage / "scratch", ignore_errors=True)
        write_meta(stage, meta)
        _publish(stage, target)
    report = PrepareReport(target, meta, seconds=clock.seconds)
    mb = stats.bytes / 1e6
    log.info("prepared %s: %d documents, %.1f MB, %s train + %s val tokens, in %.1f s (%.2f MB/s; %s)",
             target, stats.documents, mb, f"{splits['train']['tokens']:,}", f"{splits['val']['tokens']:,}",
             report.total_seconds, mb / max(report.total_seconds, 1e-9),
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.seconds.items()))
    return report


def _check_target(target: Path, cfg: DataConfig) -> dict[str, Any] | None:
    """Return the existing meta if ``target`` is already prepared with this config; refuse conflicts."""
    if target.exists() and not target.is_dir():
        raise UserError(f"data.dir={target} exists and is not a folder")
    meta = read_meta(target) if target.is_dir() else None
    if meta is not None:
        if meta.get("config_fingerprint") == cfg.fingerprint() and _same_tokenizer(meta, cfg):
            return meta
        if not cfg.overwrite:
            raise UserError(f"data.dir={target} was prepared with another config or tokenizer "
                            f"({_config_diff(meta.get('config', {}), to_plain(cfg))}); "
                            "pass data.overwrite=true to replace it, or choose another data.dir")
    elif target.is_dir() and any(target.iterdir()) and not cfg.overwrite:
        raise UserError(f"data.dir={target} is not empty and holds no prepared dataset; "
                        "choose an empty folder or pass data.overwrite=true")
    return None


def _same_tokenizer(meta: dict[str, Any], cfg: DataConfig) -> bool:
    if cfg.tokenizer_path is None:
        return True  # trained from the config, which the fingerprint already covers
    return Tokenizer.load(cfg.tokenizer_path).fingerprint == meta["tokenizer"]["sha256"]


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
               if k not in DataConfig.RUNTIME_ONLY and old.get(k) != v]
    return ", ".join(changed) or "different tokenizer"


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target``, removed on any failure; stale ones from killed runs are cleared."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.dir={target} cannot be created ({os_reason(exc)})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"data.dir={target} is not writable (no write permission on {parent})")
    for stale in parent.glob(f".{target.name}{STAGING_PREFIX}*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    stage = parent / f".{target.name}{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as exc:
        raise UserError(f"data.dir={target} is not writable ({os_reason(exc)})") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _publish(stage: Path, target: Path) -> None:
    """Move the complete staging folder to ``target``; an old ``target`` is set aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def split_documents(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: True for validation documents. Deterministic from the seed; both splits non-empty."""
    if num_documents < 2:
        raise UserError(f"the corpus has {num_documents} document(s); at least 2 are needed for a train/val split")
    rng = np.random.default_rng(seed)
    num_val = min(num_documents - 1, max(1, round(num_documents * val_fraction)))
    is_val = np.zeros(num_documents, dtype=bool)
    is_val[rng.choice(num_documents, size=num_val, replace=False)] = True
    return is_val


def _tokenizer(cfg: DataConfig, ds: datasets.Dataset, is_val: np.ndarray) -> Tokenizer:
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
            writers[name].write(_with_eod(values, lengths, mask, eod_id, writers[name].dtype), int(mask.sum()))


def _with_eod(values: np.ndarray, lengths: np.ndarray, keep: np.ndarray, eod_id: int, dtype: np.dtype) -> np.ndarray:
    """The kept documents' tokens, each followed by ``eod_id``, as one flat array."""
    kept_lengths = lengths[keep]
    tokens = values[np.repeat(keep, lengths)]
    out = np.full(len(tokens) + len(kept_lengths), eod_id, dtype=dtype)
    # Token j of kept document d lands j + d places further on: one EOD precedes it per earlier document.
    out[np.arange(len(tokens)) + np.repeat(np.arange(len(kept_lengths)), kept_lengths)] = tokens
    return out


def _meta(cfg: DataConfig, tokenizer: Tokenizer, splits: dict[str, Any], stats: CorpusStats) -> dict[str, Any]:
    if splits["train"]["tokens"] == 0:
        raise UserError("the training split holds no tokens")
    return {
        "format_version": FORMAT_VERSION,
        "llmtrain_version": llmtrain.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "eod_id": tokenizer.eod_id,
        "tokenizer": {"file": tokenizer.file_name, "sha256": tokenizer.fingerprint},
        "splits": splits,
        "source": {"kind": cfg.source.value, **asdict(stats)},
        "config": to_plain(cfg),
        "config_fingerprint": cfg.fingerprint(),
    }


def describe(meta: dict[str, Any]) -> str:
    """One line about a prepared dataset."""
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    return (f"{meta['source']['kind']}: {tr['documents'] + va['documents']} documents, vocab {meta['vocab_size']}, "
            f"{tr['tokens']:,} train / {va['tokens']:,} val tokens ({meta['dtype']}), {META_FILE} ok")
