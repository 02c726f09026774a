"""llmtrain-prepare's pipeline: exact packing, honest meta.json, atomic and idempotent writes, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmtrain.config import DataConfig, Source, TextUnit
from llmtrain.data.pipeline import split_documents, with_eod
from llmtrain.data.prepare import prepare
from llmtrain.data.reader import PreparedData
from llmtrain.data.shards import token_dtype
from llmtrain.errors import UserError
from tests.conftest import small_data_config

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_text_corpus(folder: Path, num_docs: int = 40, seed: int = 0) -> list[str]:
    """Documents with varied words, unicode and whitespace; .txt (one doc each), .jsonl and .parquet."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(num_docs):
        words = rng.choice(WORDS, size=int(rng.integers(30, 120)))
        docs.append(f"doc {i} 日本 🙂\t" + " ".join(words) + "\n  indented line\n")
    folder.mkdir(parents=True, exist_ok=True)
    third = num_docs // 3
    for i, doc in enumerate(docs[:third]):
        (folder / f"d{i:03d}.txt").write_text(doc)
    with open(folder / "docs.jsonl", "w") as f:
        for doc in docs[third: 2 * third]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": docs[2 * third:], "n": list(range(num_docs - 2 * third))}),
                   folder / "docs.parquet")
    return docs


def text_config(tmp_path: Path, paths: list[str], **overrides) -> DataConfig:
    fields = dict(source=Source.text, paths=paths, dir=str(tmp_path / "out"), vocab_size=300, num_proc=1,
                  val_fraction=0.1)
    fields.update(overrides)
    return DataConfig(**fields)


def decode_documents(folder: Path, split: str) -> list[str]:
    data = PreparedData(folder)
    tokenizer = data.tokenizer()
    tokens = np.concatenate([np.asarray(s) for s in data.split(split).shards])
    assert tokens[-1] == tokenizer.eod_id
    cuts = np.flatnonzero(tokens == tokenizer.eod_id)
    return [tokenizer.decode(doc.tolist()) for doc in np.split(tokens, cuts + 1)[:-1] if True]


def test_meta_counts_equal_the_shards(prepared_small):
    meta = json.loads((prepared_small / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    assert dtype == np.uint16 and meta["vocab_size"] == 1024
    for split in ("train", "val"):
        info = meta["splits"][split]
        sizes = [(prepared_small / s["file"]).stat().st_size // dtype.itemsize for s in info["shards"]]
        assert sizes == [s["tokens"] for s in info["shards"]]
        assert sum(sizes) == info["tokens"]
        assert all(n <= 50_000 for n in sizes)
        tokens = np.concatenate([np.fromfile(prepared_small / s["file"], dtype=dtype) for s in info["shards"]])
        assert int((tokens == meta["eod_id"]).sum()) == info["documents"]  # one EOD per document
    total = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert total == meta["source"]["documents"] == 150
    assert meta["splits"]["val"]["documents"] == round(150 * 0.05)


def test_every_source_document_comes_back_exactly(tmp_path):
    docs = write_text_corpus(tmp_path / "corpus")
    report = prepare(text_config(tmp_path, [str(tmp_path / "corpus")]))
    out = report.data_dir
    train, val = decode_documents(out, "train"), decode_documents(out, "val")
    assert len(val) == 4 and len(train) == 36
    assert sorted(train + val) == sorted(docs)
    assert report.meta["source"]["files"] == 13 + 2
    assert report.meta["source"]["bytes"] == sum(p.stat().st_size for p in (tmp_path / "corpus").iterdir())


def test_with_eod_places_separators():
    values = np.array([1, 2, 3, 4, 5], dtype=np.uint16)
    out = with_eod(values, np.array([2, 1, 2]), np.array([True, False, True]), 9, np.dtype(np.uint16))
    assert out.tolist() == [1, 2, 9, 4, 5, 9]
    out = with_eod(values, np.array([0, 5]), np.array([True, True]), 9, np.dtype(np.uint16))
    assert out.tolist() == [9, 1, 2, 3, 4, 5, 9]


def test_split_is_deterministic_and_never_empty():
    a, b = split_documents(1000, 0.01, 3), split_documents(1000, 0.01, 3)
    assert np.array_equal(a, b) and a.sum() == 10
    assert not np.array_equal(a, split_documents(1000, 0.01, 4))
    assert split_documents(2, 0.001, 0).sum() == 1 and split_documents(2, 0.999, 0).sum() == 1
    with pytest.raises(UserError, match="at least 2"):
        split_documents(1, 0.5, 0)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_text_units(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nstill one\n\n\npara two\n\npara three\n")
    (tmp_path / "b.txt").write_text("another para\n\nand one more\n")
    cfg = text_config(tmp_path, [str(tmp_path / "*.txt")], text_unit=TextUnit.paragraph, vocab_size=276)
    meta = prepare(cfg).meta
    assert meta["source"]["documents"] == 5
    cfg = text_config(tmp_path, [str(tmp_path / "*.txt")], text_unit=TextUnit.line, vocab_size=276,
                      dir=str(tmp_path / "lines"))
    assert prepare(cfg).meta["source"]["documents"] == 4 + 2


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    write_text_corpus(corpus, num_docs=12)
    (corpus / "bad.txt").write_bytes(b"valid start \xff\xfe then \xc3 more \xe2\x82 end")
    with open(corpus / "docs.jsonl", "ab") as f:
        f.write(b'{"text": "json with bad \xff byte"}\n')
    meta = prepare(text_config(tmp_path, [str(corpus)])).meta
    # \xff and \xfe are one invalid sequence each, \xc3 and the truncated \xe2\x82 one each; one in the jsonl
    assert meta["source"]["invalid_utf8_sequences"] == 4 + 1
    assert sorted(Path(p).name for p in meta["source"]["invalid_utf8_files"]) == ["bad.txt", "docs.jsonl"]
    docs = decode_documents(Path(meta["config"]["dir"]), "train") + decode_documents(Path(meta["config"]["dir"]), "val")
    assert "valid start \ufffd\ufffd then \ufffd more \ufffd end" in docs
    assert "json with bad \ufffd byte" in docs


def test_rerun_does_nothing_and_conflicts_are_refused(prepared_small):
    cfg = small_data_config(prepared_small, num_proc=2)  # num_proc does not change the output
    before = {p.name: p.stat().st_mtime_ns for p in prepared_small.iterdir()}
    report = prepare(cfg)
    assert report.skipped
    assert {p.name: p.stat().st_mtime_ns for p in prepared_small.iterdir()} == before
    with pytest.raises(UserError, match=r"prepared with another config or tokenizer \(vocab_size: 1024 -> 512\)"):
        prepare(small_data_config(prepared_small, vocab_size=512))
    assert {p.name: p.stat().st_mtime_ns for p in prepared_small.iterdir()} == before


def test_overwrite_replaces(tmp_path):
    cfg = small_data_config(tmp_path / "d", max_documents=20, vocab_size=400)
    prepare(cfg)
    meta = prepare(small_data_config(tmp_path / "d", max_documents=20, vocab_size=600, overwrite=True)).meta
    assert meta["vocab_size"] == 600
    assert PreparedData(tmp_path / "d").tokenizer().vocab_size == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging or old folder left


def test_reused_tokenizer(tmp_path, prepared_small):
    cfg = small_data_config(tmp_path / "d", max_documents=20, tokenizer_path=str(prepared_small / "tokenizer.model"))
    meta = prepare(cfg).meta
    assert meta["tokenizer"]["sha256"] == PreparedData(prepared_small).tokenizer_fingerprint


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: [str(d / "missing.txt")], "no such file or folder"),
        (lambda d: [str(d / "*.nothing")], "no file matches"),
        (lambda d: [(d / "e1.txt").write_text("") and str(d / "e1.txt") or str(d / "e1.txt")], "the corpus is empty"),
        (lambda d: [(d / "one.txt").write_text("a single document") and str(d / "one.txt")], "at least 2 are needed"),
        (lambda d: [(d / "x.jsonl").write_text('{"body": "no text field"}\n') and str(d / "x.jsonl")],
         "has no column 'text'"),
    ],
)
def test_bad_input_leaves_nothing(tmp_path, make, message):
    corpus = tmp_path / "c"
    corpus.mkdir()
    cfg = text_config(tmp_path, make(corpus))
    with pytest.raises(UserError, match=message):
        prepare(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_vocabulary_too_large_leaves_nothing(tmp_path):
    write_text_corpus(tmp_path / "c", num_docs=6)
    with pytest.raises(UserError, match=r"data.vocab_size=20000 is more than this corpus supports \(at most \d+\)"):
        prepare(text_config(tmp_path, [str(tmp_path / "c")], vocab_size=20000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_unwritable_or_foreign_target(tmp_path):
    write_text_corpus(tmp_path / "c", num_docs=6)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot be created"):
        prepare(text_config(tmp_path, [str(tmp_path / "c")], dir=str(tmp_path / "file" / "sub")))
    with pytest.raises(UserError, match="exists and is not a folder"):
        prepare(text_config(tmp_path, [str(tmp_path / "c")], dir=str(tmp_path / "file")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no prepared dataset"):
        prepare(text_config(tmp_path, [str(tmp_path / "c")], dir=str(tmp_path / "busy")))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_stale_staging_from_a_killed_run_is_cleared(tmp_path):
    stale = tmp_path / ".d.partial-999999999"
    stale.mkdir()
    (stale / "train_000.bin").write_bytes(b"\0" * 10)
    prepare(small_data_config(tmp_path / "d", max_documents=20, vocab_size=512))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_folder_without_meta_is_not_a_dataset(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="is not a prepared dataset"):
        PreparedData(tmp_path / "half")


def test_truncated_shard_and_corrupt_meta_are_refused(tmp_path):
    folder = tmp_path / "d"
    prepare(small_data_config(folder, max_documents=20, vocab_size=512))
    with open(folder / "train_000.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"train_000.bin holds 50 tokens, meta.json says 50,000: .*re-prepare with"):
        PreparedData(folder).split("train")
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable or corrupt"):
        PreparedData(folder)


def test_config_checks_collect_every_problem():
    with pytest.raises(ValueError) as err:
        DataConfig(dir="x", source=Source.text, vocab_size=10, val_fraction=0.0, num_proc=0)
    text = str(err.value)
    for part in ("data.paths", "data.vocab_size=10", "data.val_fraction=0.0", "data.num_proc=0"):
        assert part in text
    assert "\n" not in text


def test_fingerprint_ignores_runtime_fields():
    a = DataConfig(dir="a", num_proc=1)
    assert a.fingerprint() == DataConfig(dir="b", num_proc=4, overwrite=True).fingerprint()
    assert a.fingerprint() != DataConfig(dir="a", seed=2).fingerprint()


def test_no_environment_leaks_into_cwd(tmp_path):
    assert not any(p.name in ("outputs", "multirun") for p in Path(os.getcwd()).iterdir())
