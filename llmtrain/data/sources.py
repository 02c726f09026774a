"""Corpus sources: every one becomes a `datasets.Dataset` with a single ``text`` column, one row per document.

Local files are loaded with `datasets`' own builders: plain text (the stdlib's ``.py`` files, ``.txt``, any
other suffix) through the Generator builder, ``.jsonl``/``.json`` and ``.parquet`` through the ``json`` and
``parquet`` builders. Bytes that are not valid UTF-8 are replaced by U+FFFD and counted instead of failing.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import sysconfig
from collections import Counter
from collections.abc import Iterator
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
    """Return ``files`` with each one holding invalid UTF-8 swapped for a repaired copy under ``scratch``."""
    out = []
    for i, path in enumerate(files):
        raw = path.read_bytes()
        stats.bytes += len(raw)
        text, bad = decode_utf8(raw)
        if not bad:
            out.append(path)
            continue
        stats.invalid_utf8_files.append(str(path))
        stats.invalid_utf8_sequences += bad
        fixed = scratch / f"{i:06d}{path.suffix}"
        fixed.parent.mkdir(parents=True, exist_ok=True)
        fixed.write_text(text, encoding="utf-8")
        out.append(fixed)
    return out


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
    stats.invalid_utf8_sequences += int(bad.sum())
    stats.invalid_utf8_files += [ds.data.column("file")[int(i)].as_py() for i in np.flatnonzero(bad)]
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
    if cfg.max_documents and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    stats.documents = len(ds)
    text = ds.data.column(TEXT_COLUMN)
    num_chars = pc.sum(pc.utf8_length(text)).as_py() or 0 if len(ds) else 0
    if num_chars == 0:
        raise UserError(f"the corpus is empty ({stats.documents} documents, no text) — check data.paths / data.source")
    if cfg.source == Source.hf or cfg.max_documents:
        stats.bytes = pc.sum(pc.binary_length(text)).as_py()
    if stats.invalid_utf8_files:
        names = Counter(Path(p).name for p in stats.invalid_utf8_files)
        log.warning("%d file(s) held invalid UTF-8 (%d sequences replaced by U+FFFD): %s",
                    len(stats.invalid_utf8_files), stats.invalid_utf8_sequences, ", ".join(sorted(names)[:5]))
    return ds, stats
