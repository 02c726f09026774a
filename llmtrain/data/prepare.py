"""``llmtrain-prepare``: corpus -> tokenizer (trained, or data.tokenizer_path) -> packed memory-mapped shards.

Everything is written into a staging folder beside ``data.dir`` and moved into place only when complete
(``llmtrain.data.staging``), so a killed prepare never leaves a folder that looks finished. Re-running with the
same config on a complete folder does nothing.

``prepare`` runs one of three modes: the one-process pipeline here (``data.task=all``, its steps in
``llmtrain.data.pipeline``); ``llmtrain.data.tasks``, the same steps as a plan, K tokenize tasks and a merge
(``data.num_tasks``); and ``llmtrain.data.streaming``, which tokenizes a stream in bounded memory
(``data.streaming=true``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from llmtrain.config import DataConfig
from llmtrain.data.pipeline import load_or_train_tokenizer, pack, split_documents, tokenize
from llmtrain.data.shards import write_meta
from llmtrain.data.sources import load_corpus
from llmtrain.data.staging import PrepareReport, Stopwatch, build_meta, check_target, publish, staging
from llmtrain.data.streaming import prepare_streaming
from llmtrain.data.tasks import run_phase

log = logging.getLogger("llmtrain")


def prepare(cfg: DataConfig) -> PrepareReport:
    """Prepare ``cfg.dir`` from the configured source (or run the phase ``cfg.task`` of it); returns what was done."""
    if cfg.streaming:
        return prepare_streaming(cfg)
    if cfg.task != "all":
        return run_phase(cfg)
    target = Path(cfg.dir).expanduser().resolve()
    existing = check_target(target, cfg)
    if existing is not None:
        log.info("%s is already prepared with this config (%s train tokens); nothing to do",
                 target, f"{existing['splits']['train']['tokens']:,}")
        return PrepareReport(target, existing, skipped=True)
    clock = Stopwatch()
    with staging(target) as stage:
        with clock.stage("load"):
            ds, stats = load_corpus(cfg, stage / "scratch")
        is_val = split_documents(len(ds), cfg.val_fraction, cfg.seed)
        with clock.stage("tokenizer"):
            tokenizer = load_or_train_tokenizer(cfg, ds, is_val)
            tokenizer.save(stage / tokenizer.file_name)
        with clock.stage("tokenize"):
            ids = tokenize(ds, stage / tokenizer.file_name, cfg.num_proc)
        with clock.stage("pack"):
            splits = pack(ids, is_val, tokenizer, stage, cfg.shard_tokens)
        meta = build_meta(cfg, tokenizer, splits, stats)
        shutil.rmtree(stage / "scratch", ignore_errors=True)
        write_meta(stage, meta)
        publish(stage, target)
    report = PrepareReport(target, meta, seconds=clock.seconds)
    mb = stats.bytes / 1e6
    log.info("prepared %s: %d documents, %.1f MB, %s train + %s val tokens, in %.1f s (%.2f MB/s; %s)",
             target, stats.documents, mb, f"{splits['train']['tokens']:,}", f"{splits['val']['tokens']:,}",
             report.total_seconds, mb / max(report.total_seconds, 1e-9),
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.seconds.items()))
    return report
