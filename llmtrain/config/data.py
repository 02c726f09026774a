"""The corpus, its tokenizer and its packing: ``data.*`` (written by ``llmtrain-prepare``, read by training)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from omegaconf import MISSING

from llmtrain.config.checks import (
    MAX_COUNT,
    MAX_SEED,
    MAX_VOCAB,
    bounded,
    bounded_each,
    nonempty,
    raise_problems,
    to_plain,
)


class Source(str, Enum):
    """Where ``llmtrain-prepare`` reads documents from."""

    stdlib = "stdlib"
    text = "text"
    hf = "hf"


class TokenizerType(str, Enum):
    """The sentencepiece model type."""

    bpe = "bpe"
    unigram = "unigram"


class TextUnit(str, Enum):
    """What one document is inside a plain-text file."""

    document = "document"
    paragraph = "paragraph"
    line = "line"

@dataclass(kw_only=True)
class MixSource:
    """One prepared dataset of a weighted training mixture (``data.mix``)."""

    dir: str = MISSING
    """A folder written by llmtrain-prepare; every source of a mix has the same tokenizer."""
    weight: float = 1.0
    """Its share of the training samples, relative to the other sources' weights (> 0)."""
    name: str = ""
    """Its name in metrics (tokens_seen/<name>, val_loss/<name>); empty = the folder's name."""


@dataclass(kw_only=True)
class DataConfig:
    """The corpus, its tokenizer and its packing (written by ``llmtrain-prepare``, read by training)."""

    source: Source = Source.stdlib
    """Corpus source: stdlib (the running Python's standard library, no download) | text (local files) | hf."""
    dir: str = MISSING
    """Folder of the prepared dataset: shards, tokenizer (.model or .json) and meta.json (not needed with data.mix)."""
    mix: list[MixSource] | None = None
    """Training: a weighted blend of prepared folders instead of data.dir, e.g.
    '[{dir: data/prose, weight: 0.7}, {dir: data/code, weight: 0.3}]'; each source keeps its own epoch order."""
    paths: list[str] = field(default_factory=list)
    """source=text: files, folders (searched recursively) or glob patterns; .txt/.jsonl/.json/.parquet."""
    text_field: str = "text"
    """source=text (.jsonl/.parquet) and source=hf: the column that holds the document text."""
    text_unit: TextUnit = TextUnit.document
    """source=text, plain files: one document per file | per blank-line paragraph | per line."""
    hf_name: str | None = None
    """source=hf: the `datasets` hub name (needs network; not used in tests)."""
    hf_config: str | None = None
    """source=hf: the dataset configuration name."""
    hf_split: str = "train"
    """source=hf: the split to read."""
    max_documents: int = 0
    """Keep only N documents (the first N in the seed-shuffled file order; 0 = all); for quick experiments."""
    vocab_size: int = 8192
    """Tokenizer vocabulary size (byte fallback needs at least 259 + a few merges)."""
    tokenizer_type: TokenizerType = TokenizerType.bpe
    """sentencepiece model type."""
    tokenizer_sample_documents: int = 1000
    """Number of training documents (chosen by seed) the tokenizer is trained on."""
    tokenizer_path: str | None = None
    """Reuse this tokenizer instead of training one: a sentencepiece .model, or a Hugging Face tokenizer.json."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (chosen by seed, at least one document)."""
    seed: int = 1234
    """Seed of the train/val split and the tokenizer sample."""
    num_proc: int = 2
    """Processes used to tokenize (Dataset.map num_proc; sentencepiece threads with data.streaming=true)."""
    shard_tokens: int = 1 << 26
    """Maximum tokens per shard file."""
    overwrite: bool = False
    """Prepare data.dir again even when it is already prepared (with this config or another)."""
    prepare_if_missing: bool = False
    """Training: prepare data.dir first when it holds no dataset (set by naming a source: data=stdlib|text|hf)."""
    num_tasks: int = 1
    """Split tokenizing into this many independent tasks, each run by its own data.task=<i> (slurm/prepare.sh)."""
    task: str = "all"
    """all: the whole prepare in this process | plan | <i> in [0, num_tasks): tokenize slice i | merge: meta.json."""
    streaming: bool = False
    """Tokenize a stream (datasets' IterableDataset) in bounded memory; its val split is per document, not by count."""
    allow_invalid_utf8: bool = False
    """Prepare a corpus even when more than half of its bytes are in files that are not UTF-8 text (an invalid
    sequence per 10 bytes or more: binary data or another encoding); each invalid sequence is replaced by U+FFFD."""
    verify: bool = False
    """Training: before the first step every rank reads every shard and checks its size, token ids and the checksum
    meta.json records."""

    def __post_init__(self) -> None:
        problems = []
        problems += self._task_problems()
        if self.source == Source.text and not self.paths:
            problems.append("data=text needs data.paths=[file,...]")
        if self.source == Source.hf and not self.hf_name:
            problems.append("data=hf needs data.hf_name=<dataset>")
        problems += bounded_each("data.", self, {
            "num_proc": (1, 1024), "shard_tokens": (1024, 1 << 40),
            "max_documents": (0, MAX_COUNT), "tokenizer_sample_documents": (1, MAX_COUNT), "seed": (0, MAX_SEED)})
        if not 260 <= self.vocab_size <= MAX_VOCAB:
            problems.append(f"data.vocab_size={self.vocab_size} must be in [260, {MAX_VOCAB}]")
        problems += bounded("data.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        problems += nonempty("data.text_field", self.text_field, "name the column that holds the text")
        problems += nonempty("data.hf_split", self.hf_split, "name the split to read, e.g. data.hf_split=train")
        problems += self._mix_problems()
        raise_problems(problems, "data")

    def _mix_problems(self) -> list[str]:
        if self.mix is None:
            return []
        problems = []
        if not self.mix:
            problems.append("data.mix=[] names no source; give at least one {dir: ..., weight: ...}")
        if self.dir:
            problems.append(f"data.dir={self.dir} and data.mix are both set: train on a mix with data.dir=''")
        for i, source in enumerate(self.mix):
            problems += bounded(f"data.mix[{i}].weight", source.weight, 0.0, low_open=True)
            problems += nonempty(f"data.mix[{i}].dir", source.dir, "give a prepared folder")
        names = [source.name or Path(source.dir).name for source in self.mix]
        if len(set(names)) < len(names):
            problems.append(f"data.mix names {names} repeat; give each source its own name: ...")
        return problems

    def _task_problems(self) -> list[str]:
        if self.num_tasks < 1 or self.num_tasks > 1 << 20:
            return bounded("data.num_tasks", self.num_tasks, 1, 1 << 20)
        if self.streaming and (self.num_tasks > 1 or self.task != "all"):
            return ["data.streaming=true runs in one process: leave data.num_tasks=1 and data.task=all"]
        if self.task == "all":
            if self.num_tasks > 1:
                return [f"data.num_tasks={self.num_tasks} needs data.task=plan, then 0..{self.num_tasks - 1}, then "
                        "merge (bash slurm/prepare.sh runs them as a Slurm array)"]
            return []
        if self.task in ("plan", "merge") or (self.task.isdigit() and int(self.task) < self.num_tasks):
            return []
        return [f"data.task={self.task} must be all, plan, merge or a task number in [0, {self.num_tasks})"]

    @property
    def task_index(self) -> int | None:
        """The number of the tokenize task this process runs (data.task=<i>), or None for all/plan/merge."""
        return int(self.task) if self.task.isdigit() else None

    # Fields that change how a prepare runs but not what it writes (num_tasks/task: the merged folder is the same).
    RUNTIME_ONLY = ("dir", "mix", "num_proc", "overwrite", "prepare_if_missing", "num_tasks", "task",
                    "allow_invalid_utf8", "verify")
    # Fields added after datasets were prepared: at these values they stay out of the fingerprint, so a folder
    # prepared before the field existed still counts as prepared with the same config.
    FINGERPRINT_SINCE = {"streaming": False}

    def fingerprint(self) -> str:
        """SHA-256 of every field that determines the prepared output (not the RUNTIME_ONLY ones)."""
        payload = {k: v for k, v in to_plain(self).items()
                   if k not in self.RUNTIME_ONLY and self.FINGERPRINT_SINCE.get(k, ...) != v}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
