"""Packed token shards: flat binary files of uint16/uint32 token ids, described by ``meta.json``.

A prepared folder holds ``meta.json`` (written last: its presence means the folder is complete), its tokenizer
(``tokenizer.model`` or ``tokenizer.json``, named in meta.json) and ``<split>_<k>.bin`` shards. Every document is
followed by the end-of-document id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.errors import UserError

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer.json")
"""The names a tokenizer file may have in a folder (prepared data, checkpoint, export, transformers model)."""
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train_000.bin``."""
    return f"{split}_{index:03d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to ``<split>_000.bin``, ``<split>_001.bin``, ... of at most ``shard_tokens`` each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file = None

    def _open_next(self) -> None:
        self.close()
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 -- kept open across write() calls
        self.shards.append({"file": name, "tokens": 0})

    def write(self, tokens: np.ndarray, documents: int = 0) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        self.documents += documents
        while tokens.size:
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            chunk.tofile(self._file)
            self.shards[-1]["tokens"] += int(chunk.size)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def summary(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def find_tokenizer(folder: Path) -> Path | None:
    """The folder's tokenizer file (the first of ``TOKENIZER_FILES`` present), or None."""
    return next((folder / name for name in TOKENIZER_FILES if (folder / name).is_file()), None)


def read_meta(folder: str | Path) -> dict[str, Any] | None:
    """The folder's meta.json, or None when the folder is not a complete prepared dataset."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable or corrupt ({exc}); prepare the dataset again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write meta.json atomically (temp file + rename), so a reader never sees half of it."""
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, folder / META_FILE)


@dataclass
class TokenSplit:
    """One split of a prepared dataset: its shards as read-only memory maps."""

    name: str
    shards: list[np.memmap]

    @classmethod
    def open(cls, folder: str | Path, meta: dict[str, Any], name: str) -> TokenSplit:
        """Map split ``name`` of the prepared ``folder`` whose meta.json is ``meta``; checks every shard's size."""
        folder = Path(folder)
        if name not in meta["splits"]:
            raise UserError(f"{folder} has no split {name!r} (has {sorted(meta['splits'])})")
        dtype = np.dtype(meta["dtype"])
        shards = []
        for shard in meta["splits"][name]["shards"]:
            path = folder / shard["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} is missing or truncated ({size} bytes, meta.json says "
                                f"{shard['tokens']} tokens); prepare the dataset again")
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
        return cls(name=name, shards=shards)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)
