"""Packed token shards: flat binary files of uint16/uint32 token ids, described by ``meta.json``.

A prepared folder holds ``meta.json`` (written last: its presence means the folder is complete), its tokenizer
(``tokenizer.model`` or ``tokenizer.json``, named in meta.json) and ``<split>_<k>.bin`` shards. Every document is
followed by the end-of-document id.

meta.json lists each shard with its token count, the BLAKE2b checksum of its bytes and its largest token id, all
taken while the shard is written (``ShardWriter``: the bytes are hashed from memory, the file is never read back).
Opening a split checks every shard's size (``TokenSplit.open``); ``verify_split`` reads every byte and checks the
checksums. Folders prepared before checksums were recorded list sizes only: they still open, and
``verify_split`` says that it could check their sizes and token ids only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llmtrain.errors import UserError

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer.json")
"""The names a tokenizer file may have in a folder (prepared data, checkpoint, export, transformers model)."""
FORMAT_VERSION = 1
SPLITS = ("train", "val")
CHECKSUM = "blake2b"
"""The key of a shard's checksum in meta.json: ``hashlib.blake2b(digest_size=32)`` of its bytes, in hex."""
MAX_ID = "max_token_id"
"""The key of the largest token id, per shard and for the whole folder, in meta.json."""
REPREPARE = "re-prepare with data.overwrite=true"
"""How every message about a damaged folder ends: the fix."""


def new_checksum() -> hashlib.blake2b:
    """An empty shard checksum (see ``CHECKSUM``)."""
    return hashlib.blake2b(digest_size=32)


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train_000.bin``."""
    return f"{split}_{index:03d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to ``<split>_000.bin``, ``<split>_001.bin``, ... of at most ``shard_tokens`` each,
    recording each shard's token count, checksum and largest token id as its bytes are written."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file = None
        self._checksum = new_checksum()
        self._max_id = 0

    def _open_next(self) -> None:
        self.close()
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 -- kept open across write() calls
        self._checksum, self._max_id = new_checksum(), 0
        self.shards.append({"file": name, "tokens": 0})

    def write(self, tokens: np.ndarray, documents: int = 0) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.documents += documents
        while tokens.size:
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            chunk.tofile(self._file)
            self._checksum.update(chunk)  # the bytes just written, from memory: the file is never read back
            self._max_id = max(self._max_id, int(chunk.max()))
            self.shards[-1]["tokens"] += int(chunk.size)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.shards[-1].update({CHECKSUM: self._checksum.hexdigest(), MAX_ID: self._max_id})

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


def recorded_max_id(meta: dict[str, Any]) -> tuple[int, str] | None:
    """The largest token id meta.json records and the shard that holds it; None for a folder prepared before the
    largest ids were recorded."""
    shards = [s for split in meta["splits"].values() for s in split["shards"] if MAX_ID in s]
    if not shards:
        return None
    top = max(shards, key=lambda s: s[MAX_ID])
    return int(top[MAX_ID]), top["file"]


def check_size(path: Path, tokens: int, dtype: np.dtype) -> None:
    """Refuse a shard that is missing or does not hold the ``tokens`` meta.json lists for it, naming both counts."""
    if not path.is_file():
        raise UserError(f"{path} is missing (meta.json lists it with {tokens:,} tokens); {REPREPARE}")
    size = path.stat().st_size
    found, rest = divmod(size, dtype.itemsize)
    if rest:
        raise UserError(f"{path} holds {size:,} bytes, not a whole number of {dtype.name} tokens (meta.json says "
                        f"{tokens:,} tokens): the shard changed after it was prepared; {REPREPARE}")
    if found != tokens:
        raise UserError(f"{path} holds {found:,} tokens, meta.json says {tokens:,}: the shard or meta.json changed "
                        f"after it was prepared; {REPREPARE}")


def out_of_vocabulary(path: Path, offset: int, token_id: int, vocab_size: int) -> UserError:
    """The error for a token id at or above the vocabulary size, found at token ``offset`` of the shard ``path``."""
    return UserError(f"{path} holds token id {token_id} at token {offset:,}, outside the vocabulary of "
                     f"{vocab_size:,} in meta.json: the shard changed after it was prepared; {REPREPARE}")


@dataclass
class TokenSplit:
    """One split of a prepared dataset: its shards as read-only memory maps."""

    name: str
    shards: list[np.memmap]
    files: list[Path] = field(default_factory=list)
    """Each shard's path (under the folder as it was given), for messages."""
    vocab_size: int = 0
    """Every token id is below this (meta.json's vocab_size); 0 when meta.json does not say."""

    @classmethod
    def open(cls, folder: str | Path, meta: dict[str, Any], name: str) -> TokenSplit:
        """Map split ``name`` of the prepared ``folder`` whose meta.json is ``meta``; checks every shard's size."""
        folder = Path(folder)
        if name not in meta["splits"]:
            raise UserError(f"{folder} has no split {name!r} (has {sorted(meta['splits'])})")
        dtype = np.dtype(meta["dtype"])
        shards, files = [], []
        for shard in meta["splits"][name]["shards"]:
            path = folder / shard["file"]
            check_size(path, shard["tokens"], dtype)
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
            files.append(path)
        return cls(name=name, shards=shards, files=files, vocab_size=int(meta.get("vocab_size", 0)))

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)


_SCAN_BYTES = 1 << 24  # bytes read at a time when verifying: a multiple of every token size
_BAR_BYTES = 1 << 28  # folders smaller than this are verified without a progress bar


@dataclass
class VerifyReport:
    """What ``verify_shards`` checked: every shard of a folder at its size, token ids and (where recorded) checksum."""

    folder: Path
    shards: int
    tokens: int
    unchecked: int
    """Shards meta.json records no checksum for (the folder was prepared before checksums were recorded)."""
    seconds: float

    def line(self) -> str:
        """One line for the user: all checked, or plainly what could not be."""
        head = f"{self.folder}: {self.shards} shards, {self.tokens:,} tokens"
        if not self.unchecked:
            return f"{head}: every size, token id and {CHECKSUM} checksum matches meta.json ({self.seconds:.1f} s)"
        which = "no checksums" if self.unchecked == self.shards else f"no checksum for {self.unchecked} shards"
        return (f"{head}: sizes and token ids ok, but this folder records {which} (it was prepared before they were "
                f"recorded), so changed bytes go unnoticed; {REPREPARE} to get them")


def verify_shards(folder: str | Path, meta: dict[str, Any], show_progress: bool = False) -> VerifyReport:
    """Read every shard of a prepared folder: refuse the first that is missing, has another size than meta.json
    lists, fails its recorded checksum or holds a token id outside the vocabulary. ``show_progress``: a progress
    bar (on one process only) for folders of more than ``_BAR_BYTES``."""
    folder = Path(folder)
    dtype = np.dtype(meta["dtype"])
    vocab_size = int(meta.get("vocab_size", 0))
    listed = [(folder / shard["file"], shard) for split in SPLITS if split in meta["splits"]
              for shard in meta["splits"][split]["shards"]]
    for path, shard in listed:  # every size first: cheap, and the scan below relies on them
        check_size(path, shard["tokens"], dtype)
    start = time.perf_counter()
    total = sum(shard["tokens"] for _, shard in listed) * dtype.itemsize
    bar = tqdm(total=total, desc="verify", unit="B", unit_scale=True, disable=not show_progress or total < _BAR_BYTES)
    unchecked = 0
    for path, shard in listed:
        checksum, bad = _scan(path, dtype, vocab_size, bar)
        if CHECKSUM in shard and checksum != shard[CHECKSUM]:
            raise UserError(f"{path} fails its checksum ({CHECKSUM} {checksum[:16]}, meta.json says "
                            f"{shard[CHECKSUM][:16]}): the file changed after it was prepared; {REPREPARE}")
        if bad is not None:
            raise out_of_vocabulary(path, *bad, vocab_size)
        unchecked += CHECKSUM not in shard
    bar.close()
    return VerifyReport(folder, len(listed), total // dtype.itemsize, unchecked, time.perf_counter() - start)


def _scan(path: Path, dtype: np.dtype, vocab_size: int, bar: tqdm) -> tuple[str, tuple[int, int] | None]:
    """The checksum of a shard's bytes, and (offset, id) of its first token id >= ``vocab_size`` (or None)."""
    checksum, first_bad, done = new_checksum(), None, 0
    buffer = bytearray(_SCAN_BYTES)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            checksum.update(view[:n])
            ids = np.frombuffer(buffer, dtype=dtype, count=n // dtype.itemsize)
            if vocab_size and first_bad is None and ids.max() >= vocab_size:
                k = int(np.argmax(ids >= vocab_size))
                first_bad = (done + k, int(ids[k]))
            done += len(ids)
            bar.update(n)
    return checksum.hexdigest(), first_bad
