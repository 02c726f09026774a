"""The typed configuration schema of llmtrain.

One dataclass per section, one root per entry point. Hydra composes YAML files from ``conf/`` onto these
schemas (``register_configs`` puts them in the ConfigStore); each CLI turns the result into these objects on
its first line, so code below ``llmtrain/cli`` never sees a ``DictConfig``.

Checks inside a section live in its ``__post_init__``; every problem is collected and raised as one
``ValueError`` that names the override to change. Nothing here probes hardware or touches the file system.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


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


def raise_problems(problems: list[str], section: str) -> None:
    """Raise one ``ValueError`` listing every problem found in a section (no-op when there are none)."""
    if problems:
        raise ValueError(f"invalid {section} config: " + "; ".join(problems))


@dataclass(kw_only=True)
class DataConfig:
    """The corpus, its tokenizer and its packing (written by ``llmtrain-prepare``, read by training)."""

    source: Source = Source.stdlib
    """Corpus source: stdlib (the running Python's standard library, no download) | text (local files) | hf."""
    dir: str = MISSING
    """Folder of the prepared dataset: shards, tokenizer.model and meta.json."""
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
    """Reuse this sentencepiece .model instead of training one."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (chosen by seed, at least one document)."""
    seed: int = 1234
    """Seed of the train/val split and the tokenizer sample."""
    num_proc: int = 2
    """Processes used to tokenize (Dataset.map num_proc)."""
    shard_tokens: int = 1 << 26
    """Maximum tokens per shard file."""
    overwrite: bool = False
    """Replace a data.dir prepared with another config or tokenizer."""

    def __post_init__(self) -> None:
        problems = []
        if self.source == Source.text and not self.paths:
            problems.append("data=text needs data.paths=[file,...]")
        if self.source == Source.hf and not self.hf_name:
            problems.append("data=hf needs data.hf_name=<dataset>")
        if not 260 <= self.vocab_size <= 1 << 20:
            problems.append(f"data.vocab_size={self.vocab_size} must be in [260, 1048576]")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.num_proc < 1:
            problems.append(f"data.num_proc={self.num_proc} must be >= 1")
        if self.shard_tokens < 1024:
            problems.append(f"data.shard_tokens={self.shard_tokens} must be >= 1024")
        if self.max_documents < 0:
            problems.append(f"data.max_documents={self.max_documents} must be >= 0")
        if self.tokenizer_sample_documents < 1:
            problems.append(f"data.tokenizer_sample_documents={self.tokenizer_sample_documents} must be >= 1")
        raise_problems(problems, "data")

    # Fields that change how a prepare runs but not what it writes.
    RUNTIME_ONLY = ("dir", "num_proc", "overwrite")

    def fingerprint(self) -> str:
        """SHA-256 of every field that determines the prepared output (not dir, num_proc, overwrite)."""
        payload = {k: v for k, v in to_plain(self).items() if k not in self.RUNTIME_ONLY}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(kw_only=True)
class PrepareConfig:
    """Root of ``llmtrain-prepare``."""

    data: DataConfig = field(default_factory=DataConfig)
    """The corpus to prepare."""


def to_plain(obj: Any) -> Any:
    """A dataclass tree as JSON-ready builtins (enums become their values)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; YAML files under ``conf/`` name them in ``defaults``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
