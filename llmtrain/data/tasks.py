"""``llmtrain-prepare`` as independent tasks: one plan, K tokenize tasks over disjoint document slices, one merge.

    llmtrain-prepare data=stdlib data.dir=data/stdlib data.num_tasks=4 data.task=plan
    llmtrain-prepare data=stdlib data.dir=data/stdlib data.num_tasks=4 data.task=2      # 0..3, in any order
    llmtrain-prepare data=stdlib data.dir=data/stdlib data.num_tasks=4 data.task=merge
    bash slurm/prepare.sh 4 data=stdlib data.dir=data/stdlib                             # the same on Slurm

The phases share a work folder beside ``data.dir``, ``.<name>.tasks-<config fingerprint[:12]>/``:

    plan/       corpus/ (the one-column text Dataset, save_to_disk), the tokenizer file, val_mask.npy, plan.json
    task_<i>/   train_000.bin ..., val_000.bin ... (documents [i*D//K, (i+1)*D//K)), task.json

``plan/`` and each ``task_<i>/`` are written under a temporary name and renamed when complete, with their json
written last: a folder that holds its json is complete, anything else is redone. A failed or killed task thus
leaves nothing that looks complete, a phase that is complete is skipped, and re-running every phase redoes only
what is missing. The merge refuses (naming them) while tasks are missing, writes ``data.dir`` exactly as a
one-process prepare publishes it, and deletes the work folder.

The result is byte for byte a one-process prepare's (``data.task=all``), the ``created`` time and the runtime
fields in meta.json's ``config`` aside: the plan loads, splits and trains the tokenizer as it does; the slices
are contiguous, so the tasks' documents in task order are its document order; and the merge re-packs the tasks'
shards in that order through the same ``ShardWriter``, so even the shard boundaries are its own. That re-pack
costs one sequential copy of the tokens (small beside tokenizing them), and it matters: training windows never
cross a shard boundary (``data.reader``), so other boundaries would change the windows a run trains on. As it
copies a task's shard the merge also checks it against the checksum its task.json records.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from llmtrain.config import DataConfig
from llmtrain.data.pipeline import load_or_train_tokenizer, pack, split_documents, tokenize
from llmtrain.data.shards import (
    CHECKSUM,
    SPLITS,
    ShardWriter,
    find_tokenizer,
    new_checksum,
    token_dtype,
    write_meta,
)
from llmtrain.data.sources import CorpusStats, load_corpus
from llmtrain.data.staging import PrepareReport, Stopwatch, build_meta, check_target, publish, staging
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")
PLAN_DIR, PLAN_FILE, TASK_FILE = "plan", "plan.json", "task.json"
CORPUS_DIR, VAL_MASK_FILE = "corpus", "val_mask.npy"
_COPY_TOKENS = 1 << 24  # tokens per read when the merge re-packs a task shard: bounded memory


def work_folder(target: Path, cfg: DataConfig) -> Path:
    """The folder the phases of preparing ``target`` with ``cfg`` share (one per config, beside ``target``)."""
    return target.parent / f".{target.name}.tasks-{cfg.fingerprint()[:12]}"


def task_folder(work: Path, index: int) -> Path:
    return work / f"task_{index}"


def task_documents(num_documents: int, num_tasks: int, index: int) -> range:
    """The documents task ``index`` of ``num_tasks`` tokenizes: a contiguous slice, the slices in task order."""
    return range(index * num_documents // num_tasks, (index + 1) * num_documents // num_tasks)


def run_phase(cfg: DataConfig) -> PrepareReport:
    """Run the phase ``cfg.task`` (plan, a task number, merge); nothing when ``data.dir`` is already prepared."""
    target = Path(cfg.dir).expanduser().resolve()
    existing = check_target(target, cfg)
    if existing is not None:
        log.info("%s is already prepared with this config; data.task=%s has nothing to do", target, cfg.task)
        return PrepareReport(target, existing, skipped=True)
    work = work_folder(target, cfg)
    if cfg.task == "plan":
        return plan(cfg, work)
    if cfg.task == "merge":
        return merge(cfg, target, work)
    assert cfg.task_index is not None, cfg.task  # DataConfig checked it
    return run_task(cfg, work, cfg.task_index)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def plan(cfg: DataConfig, work: Path) -> PrepareReport:
    """Load the corpus, split it and train the tokenizer as a one-process prepare does; save all three for the
    tasks (the corpus as a Dataset they map from disk instead of reading the source again)."""
    folder = work / PLAN_DIR
    done = _read_plan(work, cfg, required=False)
    if done is not None:
        log.info("%s is complete; data.task=plan has nothing to do", folder)
        return PrepareReport(folder, done, skipped=True, note=_describe_plan(done))
    clock = Stopwatch()
    with staging(folder) as stage:
        with clock.stage("load"):
            ds, stats = load_corpus(cfg, stage / "scratch")
        if cfg.num_tasks > len(ds):
            raise UserError(f"data.num_tasks={cfg.num_tasks} is more than the corpus's {len(ds)} documents")
        is_val = split_documents(len(ds), cfg.val_fraction, cfg.seed)
        with clock.stage("tokenizer"):
            tokenizer = load_or_train_tokenizer(cfg, ds, is_val)
            tokenizer.save(stage / tokenizer.file_name)
        with clock.stage("save"):
            ds.save_to_disk(str(stage / CORPUS_DIR))
            np.save(stage / VAL_MASK_FILE, is_val)
        shutil.rmtree(stage / "scratch", ignore_errors=True)
        done = {"num_tasks": cfg.num_tasks, "documents": len(ds), "stats": asdict(stats),
                "tokenizer_sha256": tokenizer.fingerprint, "config_fingerprint": cfg.fingerprint(),
                "seconds": clock.seconds}
        (stage / PLAN_FILE).write_text(json.dumps(done, indent=2))  # last: its presence marks the plan complete
        publish(stage, folder)
    log.info("planned %d tasks over %d documents in %s (%s)", cfg.num_tasks, len(ds), folder,
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.seconds.items()))
    return PrepareReport(folder, done, seconds=clock.seconds, note=_describe_plan(done))


def _read_plan(work: Path, cfg: DataConfig, required: bool = True) -> dict[str, Any] | None:
    done = _read_json(work / PLAN_DIR / PLAN_FILE)
    if done is None:
        if required:
            raise UserError(f"data.task={cfg.task}: there is no complete plan in {work}; run data.task=plan first")
        return None
    if done["num_tasks"] != cfg.num_tasks:
        raise UserError(f"{work / PLAN_DIR} was planned for data.num_tasks={done['num_tasks']}, not "
                        f"{cfg.num_tasks}; use that, or delete {work} to plan again")
    return done


def _describe_plan(done: dict[str, Any]) -> str:
    return (f"plan of {done['num_tasks']} task(s) over {done['documents']} documents, "
            f"tokenizer {done['tokenizer_sha256'][:12]}")


def run_task(cfg: DataConfig, work: Path, index: int) -> PrepareReport:
    """Tokenize and pack the documents of task ``index`` into ``task_<index>/``; nothing if it is complete."""
    plan_done = _read_plan(work, cfg)
    folder = task_folder(work, index)
    done = _read_json(folder / TASK_FILE)
    if done is not None:
        log.info("%s is complete; data.task=%d has nothing to do", folder, index)
        return PrepareReport(folder, done, skipped=True, note=_describe_task(done))
    documents = task_documents(plan_done["documents"], cfg.num_tasks, index)
    plan_dir = work / PLAN_DIR
    clock = Stopwatch()
    with staging(folder) as stage:
        with clock.stage("load"):
            ds = datasets.load_from_disk(str(plan_dir / CORPUS_DIR)).select(documents)  # contiguous: a slice
            is_val = np.load(plan_dir / VAL_MASK_FILE)[documents.start: documents.stop]
            tokenizer_file = find_tokenizer(plan_dir)
            tokenizer = Tokenizer.load(tokenizer_file)
        with clock.stage("tokenize"):
            # the cache file goes into this task's staging folder, not beside the plan's shared corpus
            ids = tokenize(ds, tokenizer_file, cfg.num_proc, cache_file=stage / "scratch" / "ids.arrow")
        with clock.stage("pack"):
            splits = pack(ids, is_val, tokenizer, stage, cfg.shard_tokens)
        del ids
        shutil.rmtree(stage / "scratch", ignore_errors=True)
        done = {"task": index, "documents": [documents.start, documents.stop], "splits": splits,
                "seconds": clock.seconds}
        (stage / TASK_FILE).write_text(json.dumps(done, indent=2))  # last: its presence marks the task complete
        publish(stage, folder)
    log.info("%s (of %d) in %s", _describe_task(done), cfg.num_tasks,
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.seconds.items()))
    return PrepareReport(folder, done, seconds=clock.seconds, note=_describe_task(done))


def _describe_task(done: dict[str, Any]) -> str:
    tr, va = done["splits"]["train"], done["splits"]["val"]
    first, end = done["documents"]
    return (f"task {done['task']}: documents [{first}, {end}), {tr['tokens']:,} train + {va['tokens']:,} val "
            f"tokens, {task_shard_count(done)} shard(s)")


def task_shard_count(done: dict[str, Any]) -> int:
    return sum(len(done["splits"][s]["shards"]) for s in SPLITS)


def merge(cfg: DataConfig, target: Path, work: Path) -> PrepareReport:
    """Re-pack the complete tasks' shards in task order into ``target`` with its meta.json, then drop ``work``."""
    plan_done = _read_plan(work, cfg)
    missing = [i for i in range(cfg.num_tasks) if not (task_folder(work, i) / TASK_FILE).is_file()]
    if missing:
        raise UserError(f"data.task=merge: task(s) {', '.join(map(str, missing))} of {cfg.num_tasks} are not "
                        f"complete in {work}; run data.task=<i> for each first")
    tasks = [_read_json(task_folder(work, i) / TASK_FILE) for i in range(cfg.num_tasks)]
    clock = Stopwatch()
    with staging(target) as stage:
        with clock.stage("merge"):
            planned = find_tokenizer(work / PLAN_DIR)
            shutil.copyfile(planned, stage / planned.name)
            tokenizer = Tokenizer.load(stage / planned.name)
            dtype = token_dtype(tokenizer.vocab_size)
            splits = {name: _repack(work, tasks, name, stage, dtype, cfg.shard_tokens) for name in SPLITS}
        meta = build_meta(cfg, tokenizer, splits, CorpusStats(**plan_done["stats"]))
        write_meta(stage, meta)
        publish(stage, target)
    shutil.rmtree(work, ignore_errors=True)
    log.info("merged %d tasks into %s: %s train + %s val tokens in %.1f s", cfg.num_tasks, target,
             f"{splits['train']['tokens']:,}", f"{splits['val']['tokens']:,}", clock.seconds["merge"])
    return PrepareReport(target, meta, seconds=clock.seconds)


def _repack(work: Path, tasks: list[dict[str, Any]], split: str, stage: Path, dtype: np.dtype,
            shard_tokens: int) -> dict[str, Any]:
    """Append every task's shards of ``split``, in task order, to fresh shards in ``stage``: its summary."""
    writer = ShardWriter(stage, split, dtype, shard_tokens)
    for done in tasks:
        writer.documents += done["splits"][split]["documents"]
        folder = task_folder(work, done["task"])
        for shard in done["splits"][split]["shards"]:
            path = folder / shard["file"]
            tokens = np.memmap(path, dtype=dtype, mode="r")
            redo = f"delete {folder} and run data.task={done['task']} again"
            if len(tokens) != shard["tokens"]:
                raise UserError(f"{path} holds {len(tokens):,} tokens, its task.json says {shard['tokens']:,}; {redo}")
            # The task's own checksum, checked on the bytes as they are copied: the merged shards are hashed
            # afresh as they are written, so a task shard changed after its task would pass unseen otherwise.
            checksum = new_checksum()
            for start in range(0, len(tokens), _COPY_TOKENS):
                chunk = np.asarray(tokens[start: start + _COPY_TOKENS])
                checksum.update(chunk)
                writer.write(chunk)
            del tokens
            if shard.get(CHECKSUM, checksum.hexdigest()) != checksum.hexdigest():
                raise UserError(f"{path} fails its checksum ({CHECKSUM}): it changed after its task wrote it; {redo}")
    writer.close()
    return writer.summary()
