"""Corpus sources: every one becomes a `datasets.Dataset` with a single ``text`` column, one row per document.

Local files are loaded with `datasets`' own builders: plain text (the stdlib's ``.py`` files, ``.txt``, any
other suffix) through the Generator builder, ``.jsonl``/``.json`` and ``.parquet`` through the ``json`` and
``parquet`` builders. Bytes that are not valid UTF-8 are replaced by U+FFFD and counted instead of failing, as
long as the corpus is mostly text: a corpus more than half of whose bytes are in binary files (files with one
invalid UTF-8 sequence or more per ``BINARY_EVERY`` bytes; text with stray bad bytes is not binary) is refused
unless ``data.allow_invalid_utf8=true`` (``check_mostly_text``).

``stream_corpus`` reads the same sources as IterableDatasets (``streaming=True``) for ``data.streaming=true``:
the same documents in the same order, nothing materialized.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import re
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from llmtrain.config import DataConfig, Source, TextUnit
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")

TEXT_COLUMN = "text"
_BUILDER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # anything else: plain text
_REPLACEMENT = "\ufffd"


@dataclass
class CorpusStats:
    """What was read, for meta.json and the summary line."""

    documents: int = 0
    bytes: int = 0
    files: int = 0
    invalid_utf8_files: list[str] = field(default_factory=list)
    invalid_utf8_sequences: int = 0
    """Invalid byte sequences, each replaced by one U+FFFD (Unicode's maximal-subpart rule, as Python decodes)."""
    binary_files: list[str] = field(default_factory=list)
    """Files with one invalid sequence or more per ``BINARY_EVERY`` bytes: binary data (or text in another encoding)."""
    binary_bytes: int = 0
    """The sizes of the ``binary_files``, summed: what ``check_mostly_text`` weighs."""

    def add_invalid(self, name: str, size: int, invalid: int) -> None:
        """Count a file of ``size`` bytes that holds ``invalid`` (> 0) invalid UTF-8 sequences."""
        self.invalid_utf8_files.append(name)
        self.invalid_utf8_sequences += invalid
        if invalid * BINARY_EVERY >= size:
            self.binary_files.append(name)
            self.binary_bytes += size


BINARY_EVERY = 10
"""A file with one invalid UTF-8 sequence or more per this many bytes is not UTF-8 text: binary data (random bytes
have about one per two) or text in another encoding; UTF-8 text with a few stray bad bytes has far fewer."""


def check_mostly_text(stats: CorpusStats, file_bytes: int, allow: bool) -> None:
    """Refuse a corpus more than half of whose ``file_bytes`` are in binary files (``BINARY_EVERY``) unless
    ``allow`` (data.allow_invalid_utf8); else warn about the files that held invalid UTF-8, if any."""
    if not stats.invalid_utf8_files:
        return
    if allow or 2 * stats.binary_bytes <= file_bytes:
        names = Counter(Path(p).name for p in stats.invalid_utf8_files)
        log.warning("%d file(s) held invalid UTF-8 (%d sequences replaced by U+FFFD): %s",
                    len(stats.invalid_utf8_files), stats.invalid_utf8_sequences, ", ".join(sorted(names)[:5]))
        return
    raise UserError(f"{len(stats.binary_files)} of {stats.files} files, {stats.binary_bytes / file_bytes:.0%} of the "
                    f"corpus's {file_bytes:,} bytes (e.g. {stats.binary_files[0]}), are not UTF-8 text (an invalid "
                    f"sequence per {BINARY_EVERY} bytes or more: binary data, or another encoding), and a corpus more "
                    "than half such is refused; name UTF-8 text files in data.paths, or pass "
                    "data.allow_invalid_utf8=true to prepare them anyway (each invalid sequence replaced by U+FFFD)")


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` files (no site-packages): the embedded default corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if not files:
        raise UserError(f"no .py files under the standard library folder {root}")
    return files


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by ``data.paths``: files, folders (recursively) and glob patterns, sorted, without repeats."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"data.paths: no file matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            elif path.is_file():
                files.append(path)
            else:
                raise UserError(f"data.paths: no such file or folder: {match}")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise UserError(f"data.paths: no files found in {patterns}")
    return unique


def sanitize_utf8(files: list[Path], scratch: Path, stats: CorpusStats) -> list[Path]:
    """Return ``files`` with each one holding invalid UTF-8 swapped for a repaired copy under ``scratch``.

    Files are read in chunks through an incremental decoder (the same text as decoding each whole file), so
    memory does not grow with a file's size."""
    out = []
    for i, path in enumerate(files):
        size, bad = _utf8_chunks(path)
        stats.bytes += size
        if not bad:
            out.append(path)
            continue
        stats.add_invalid(str(path), size, bad)
        fixed = scratch / f"{i:06d}{path.suffix}"
        fixed.parent.mkdir(parents=True, exist_ok=True)
        with open(fixed, "w", encoding="utf-8") as f:
            _utf8_chunks(path, write=f.write)
        out.append(fixed)
    return out


def _utf8_chunks(path: Path, write: Callable[[str], object] | None = None,
                 chunk_bytes: int = 1 << 24) -> tuple[int, int]:
    """Decode ``path`` chunk by chunk, each invalid sequence replaced by U+FFFD: (bytes, invalid sequences);
    ``write`` receives the decoded text."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    size = replaced = literal = 0
    tail = b""  # a literal U+FFFD in the input may straddle two chunks
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            text = decoder.decode(raw, final=not raw)
            size += len(raw)
            replaced += text.count(_REPLACEMENT)
            literal += (tail + raw).count(_REPLACEMENT.encode())
            tail = (tail + raw)[-2:]
            if write is not None:
                write(text)
            if not raw:
                return size, replaced - literal


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode, replacing each invalid sequence by U+FFFD; returns the text and how many were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())


def _plain_text_documents(files: list[str], unit: str) -> Iterator[dict]:
    """Generator behind the plain-text Dataset: one row per document, with its file and invalid-UTF-8 count."""
    for name in files:
        with open(name, "rb") as f:
            raw = f.read()
        text, bad = decode_utf8(raw)
        if unit == TextUnit.document.value:
            pieces = [text]
        elif unit == TextUnit.paragraph.value:
            pieces = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        else:
            pieces = [line for line in text.splitlines() if line.strip()]
        for k, piece in enumerate(pieces):
            first = k == 0  # the file's byte and bad-sequence counts go on its first document only
            yield {TEXT_COLUMN: piece, "file": name,
                   "bytes": len(raw) if first else 0, "invalid_utf8": bad if first else 0}


def _load_plain_text(files: list[Path], unit: TextUnit, seed: int, cache_dir: str,
                     stats: CorpusStats) -> datasets.Dataset:
    # `datasets`' Generator builder, not its `text` builder: the latter resolves and probes every file for
    # archives (~1 ms a file, 2 of the 3 seconds of loading the 1,790-file stdlib) and cannot count bad bytes.
    # Files are visited in an order shuffled by the seed, so that Dataset.map's contiguous per-process
    # shards get a similar share of the big files.
    order = np.random.default_rng(seed).permutation(len(files))
    ds = datasets.Dataset.from_generator(
        _plain_text_documents,
        gen_kwargs={"files": [str(files[i]) for i in order], "unit": unit.value},
        cache_dir=cache_dir,
        features=datasets.Features({TEXT_COLUMN: datasets.Value("string"), "file": datasets.Value("string"),
                                    "bytes": datasets.Value("int64"), "invalid_utf8": datasets.Value("int32")}),
    )
    bad = np.asarray(ds.data.column("invalid_utf8").to_numpy())
    stats.bytes += int(pc.sum(ds.data.column("bytes")).as_py() or 0)
    names, sizes = ds.data.column("file"), np.asarray(ds.data.column("bytes").to_numpy())
    for i in np.flatnonzero(bad):  # a file's size and count are on its first document
        stats.add_invalid(names[int(i)].as_py(), int(sizes[i]), int(bad[i]))
    return ds.select_columns([TEXT_COLUMN])


def _load_files(files: list[Path], cfg: DataConfig, scratch: Path, stats: CorpusStats) -> datasets.Dataset:
    cache_dir = str(scratch / "hf-cache")
    by_builder: dict[str, list[Path]] = {}
    for path in files:
        by_builder.setdefault(_BUILDER_BY_SUFFIX.get(path.suffix.lower(), "text"), []).append(path)
    stats.files = len(files)
    parts = []
    for builder, paths in by_builder.items():
        if builder == "text":
            parts.append(_load_plain_text(paths, cfg.text_unit, cfg.seed, cache_dir, stats))
            continue
        if builder == "json":
            paths = sanitize_utf8(paths, scratch / "utf8-fixed", stats)
        else:  # parquet is binary; arrow validates its strings as UTF-8 when reading
            stats.bytes += sum(p.stat().st_size for p in paths)
        data_files = [str(p) for p in paths]
        kwargs = {"columns": [cfg.text_field]} if builder == "parquet" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", cache_dir=cache_dir, **kwargs)
        except Exception as exc:  # the builders raise many types for unreadable files
            raise UserError(f"could not read {builder} files {data_files[:3]}: {str(exc).splitlines()[0]}") from None
        if builder == "json":
            _check_json_records(ds, paths, cfg.text_field)
        parts.append(_text_only(ds, cfg.text_field, builder))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _check_json_records(ds: datasets.Dataset, paths: list[Path], field: str) -> None:
    """Every JSON record must hold a string under ``field``: name the first file and line that does not (arrow
    fills a missing field with null and types a non-string one otherwise, which would fail much later)."""
    feature = ds.features.get(field)
    if feature is None:
        return  # no record has it: _text_only names the columns there are
    is_text = getattr(feature, "dtype", None) in ("string", "large_string")
    if not is_text or ds.data.column(field).null_count:
        for path in paths:
            for where, record in _json_records(path):
                value = record.get(field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    what = "has no" if value is None else f"has a {type(value).__name__} under"
                    raise UserError(f"{path}:{where}: the record {what} {field!r} (every record needs a string "
                                    "there; set data.text_field to its text field)")
        raise UserError(f"the json files {[str(p) for p in paths[:3]]} hold no text under {field!r}; set "
                        "data.text_field to their text field")


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(line number, record) of a JSON-lines file; (record number, record) of a file holding one JSON list."""
    whole = None
    if path.suffix.lower() == ".json":  # a .json file may hold one list; a .jsonl file is read a line at a time
        try:
            whole = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except ValueError:
            whole = None
    if whole is not None:
        for number, record in enumerate(whole if isinstance(whole, list) else [whole], 1):
            yield f"record {number}", record
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield str(number), json.loads(line)


def _text_only(ds: datasets.Dataset, column: str, what: str) -> datasets.Dataset:
    if column not in ds.column_names:
        raise UserError(f"{what} data has no column {column!r} (columns: {ds.column_names}); set data.text_field")
    ds = ds.select_columns([column])
    if column != TEXT_COLUMN:
        ds = ds.rename_column(column, TEXT_COLUMN)
    dtype = getattr(ds.features[TEXT_COLUMN], "dtype", type(ds.features[TEXT_COLUMN]).__name__)
    if dtype not in ("string", "large_string"):
        raise UserError(f"{what} column {column!r} holds {dtype}, not text")
    return ds


def load_corpus(cfg: DataConfig, scratch: Path) -> tuple[datasets.Dataset, CorpusStats]:
    """Load the configured source as a one-column (``text``) Dataset; ``scratch`` holds caches and repaired files."""
    stats = CorpusStats()
    if cfg.source == Source.hf:
        try:
            ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split)
        except Exception as exc:
            raise UserError(f"could not load {cfg.hf_name!r} from the hub: {str(exc).splitlines()[0]}") from None
        ds = _text_only(ds, cfg.text_field, cfg.hf_name)
    else:
        files = stdlib_files() if cfg.source == Source.stdlib else expand_paths(cfg.paths)
        ds = _load_files(files, cfg, scratch, stats)
        check_mostly_text(stats, stats.bytes, cfg.allow_invalid_utf8)  # stats.bytes: the files' sizes, so far
    if cfg.max_documents and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    stats.documents = len(ds)
    text = ds.data.column(TEXT_COLUMN)
    num_chars = pc.sum(pc.utf8_length(text)).as_py() or 0 if len(ds) else 0
    if num_chars == 0:
        raise UserError(f"the corpus is empty ({stats.documents} documents, no text) — check data.paths / data.source")
    if cfg.source == Source.hf or cfg.max_documents:
        stats.bytes = pc.sum(pc.binary_length(text)).as_py()
    return ds, stats


# ---- streaming (data.streaming=true): the same sources as IterableDatasets, read in bounded memory --------------

STREAM_BATCH = 64  # documents per batch read from a stream (a batch is held in memory whole)


def _streamed_text_documents(files: list[str], unit: str) -> Iterator[dict]:
    """``_plain_text_documents`` for a stream: with ``text_unit=line`` a file is read a line at a time, so one huge
    file does not have to fit in memory (a whole document or paragraph file still does). The rows are the same;
    a file's invalid-UTF-8 count is spread over the documents of the lines that hold it."""
    for name in files:
        if unit != TextUnit.line.value:
            yield from _plain_text_documents([name], unit)
            continue
        size = Path(name).stat().st_size
        with open(name, "rb") as f:
            # \n never occurs inside a UTF-8 sequence, so decoding line by line replaces exactly what decoding the
            # whole file does, and splitlines() of each \n-ended line gives the pieces of the whole text's
            for raw in f:
                text, bad = decode_utf8(raw)
                for piece in text.splitlines():
                    if piece.strip():
                        yield {TEXT_COLUMN: piece, "file": name, "bytes": size, "invalid_utf8": bad}
                        size = bad = 0


@dataclass
class DocumentStream:
    """A corpus as a stream of document batches, re-readable from the start (the tokenizer reads its head first)."""

    parts: list[tuple[datasets.IterableDataset, str, str]]
    """(stream, its text column, what it is for messages), read in this order."""
    stats: CorpusStats
    """Files and the bytes known before reading (json/parquet); ``batches(count=True)`` adds the rest."""
    max_documents: int = 0
    count_text_bytes: bool = False
    """Report the documents' UTF-8 bytes (hub data, or data.max_documents), not the files'."""
    file_bytes: int = 0
    """The sizes of the files read, set by ``batches(count=True)``: what ``check_mostly_text`` weighs."""

    def batches(self, count: bool = False) -> Iterator[list[str]]:
        """Lists of document texts in corpus order (at most ``max_documents`` in all); ``count``: add the bytes,
        documents and invalid-UTF-8 counts of what is read to ``stats``."""
        documents = text_bytes = 0
        files_with_bad: dict[str, int] = {}  # invalid sequences per plain-text file, in the order met
        sizes: dict[str, int] = {}  # of the plain-text files read
        known_bytes = self.stats.bytes  # the json and parquet files', counted by stream_corpus
        for ds, column, what in self.parts:
            for batch in _read(ds, what):
                texts = _batch_texts(batch, column, what)
                if self.max_documents:
                    texts = texts[: self.max_documents - documents]
                if count:
                    text_bytes += sum(len(t.encode()) for t in texts) if self.count_text_bytes else 0
                    if "bytes" in batch and not self.count_text_bytes:
                        self.stats.bytes += sum(batch["bytes"][: len(texts)])
                    for name, size in zip(batch.get("file", ()), batch.get("bytes", ())[: len(texts)], strict=False):
                        if size:
                            sizes[name] = size
                    for name, bad in zip(batch.get("file", ()), batch.get("invalid_utf8", ())[: len(texts)],
                                         strict=False):
                        if bad:
                            files_with_bad[name] = files_with_bad.get(name, 0) + bad
                documents += len(texts)
                if texts:
                    yield texts
                if self.max_documents and documents >= self.max_documents:
                    break
            if self.max_documents and documents >= self.max_documents:
                break
        if count:
            self.stats.documents = documents
            self.file_bytes = known_bytes + sum(sizes.values())
            for name, bad in files_with_bad.items():
                self.stats.add_invalid(name, sizes.get(name, 0), bad)
            if self.count_text_bytes:
                self.stats.bytes = text_bytes


def _read(ds: datasets.IterableDataset, what: str) -> Iterator[dict[str, list]]:
    """The stream's batches; a stream reads its files only now, so their errors surface here (in many types)."""
    batches = ds.iter(batch_size=STREAM_BATCH)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:
            raise UserError(f"could not read the {what} data: {str(exc).splitlines()[0]}") from None
        yield batch


def _batch_texts(batch: dict[str, list], column: str, what: str) -> list[str]:
    if column not in batch:
        raise UserError(f"{what} data has no column {column!r} (columns: {sorted(batch)}); set data.text_field")
    texts = batch[column]
    wrong = next((t for t in texts if not isinstance(t, str)), "")
    if not isinstance(wrong, str):
        raise UserError(f"{what} column {column!r} holds {type(wrong).__name__}, not text (every record needs a "
                        "string there; set data.text_field to its text field)")
    return texts


def stream_corpus(cfg: DataConfig, scratch: Path) -> DocumentStream:
    """The configured source as a ``DocumentStream``: `datasets`' builders with ``streaming=True`` (no Arrow cache)
    and an IterableDataset over the plain-text generator; ``scratch`` holds repaired copies of bad-UTF-8 json."""
    stats = CorpusStats()
    if cfg.source == Source.hf:
        try:
            ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=True)
        except Exception as exc:
            raise UserError(f"could not load {cfg.hf_name!r} from the hub: {str(exc).splitlines()[0]}") from None
        return DocumentStream([(ds, cfg.text_field, cfg.hf_name)], stats, cfg.max_documents, count_text_bytes=True)
    files = stdlib_files() if cfg.source == Source.stdlib else expand_paths(cfg.paths)
    stats.files = len(files)
    by_builder: dict[str, list[Path]] = {}
    for path in files:
        by_builder.setdefault(_BUILDER_BY_SUFFIX.get(path.suffix.lower(), "text"), []).append(path)
    parts = []
    for builder, paths in by_builder.items():
        if builder == "text":  # the seed-shuffled file order of the non-streaming prepare
            order = np.random.default_rng(cfg.seed).permutation(len(paths))
            ds = datasets.IterableDataset.from_generator(
                _streamed_text_documents, gen_kwargs={"files": [str(paths[i]) for i in order],
                                                      "unit": cfg.text_unit.value})
            parts.append((ds, TEXT_COLUMN, "text"))
            continue
        if builder == "json":
            paths = sanitize_utf8(paths, scratch / "utf8-fixed", stats)
        else:
            stats.bytes += sum(p.stat().st_size for p in paths)
        kwargs = {"columns": [cfg.text_field]} if builder == "parquet" else {}
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", streaming=True,
                                   cache_dir=str(scratch / "hf-cache"), **kwargs)
        parts.append((ds, cfg.text_field, builder))
    return DocumentStream(parts, stats, cfg.max_documents, count_text_bytes=bool(cfg.max_documents))
