"""data.streaming=true: every document comes back exactly, the per-document split, and what a stream refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmtrain.config import TextUnit
from llmtrain.data.order import keyed_uniform
from llmtrain.data.prepare import prepare
from llmtrain.data.streaming import is_val_document
from llmtrain.errors import UserError
from tests.conftest import small_data_config
from tests.unit.test_prepare import decode_documents, text_config, write_text_corpus


def test_every_source_document_comes_back_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    docs = write_text_corpus(corpus, num_docs=60)
    (corpus / "bad.txt").write_bytes(b"valid start \xff\xfe then \xc3 more \xe2\x82 end")
    with open(corpus / "docs.jsonl", "ab") as f:
        f.write(b'{"text": "json with bad \xff byte"}\n')
    docs += ["valid start \ufffd\ufffd then \ufffd more \ufffd end", "json with bad \ufffd byte"]
    report = prepare(text_config(tmp_path, [str(corpus)], streaming=True, val_fraction=0.2))
    train, val = decode_documents(report.data_dir, "train"), decode_documents(report.data_dir, "val")
    assert sorted(train + val) == sorted(docs)
    meta = report.meta
    assert meta["source"]["documents"] == len(docs) == meta["splits"]["train"]["documents"] + len(val)
    assert meta["source"]["bytes"] == sum(p.stat().st_size for p in corpus.iterdir())
    assert meta["source"]["invalid_utf8_sequences"] == 4 + 1  # as the non-streaming prepare counts them
    assert sorted(p.split("/")[-1] for p in meta["source"]["invalid_utf8_files"]) == ["bad.txt", "docs.jsonl"]
    # the split is per document: document k is held out iff keyed_uniform(seed, k) < val_fraction
    assert len(val) == int((keyed_uniform((1234,), np.arange(len(docs))) < 0.2).sum())


def test_streaming_reads_the_documents_of_a_non_streaming_prepare(tmp_path, prepared_small):
    """Same documents in the same order: only the split (and so the shards) differ. text_unit=line is read a line
    at a time when streaming; its documents must still be the whole-file splitlines() ones."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes("one\r\ntwo\rthree\x0cfour\u2028five\n  \n\tsix  \nbad \xff\n".encode("utf-8")
                                   .replace(b"\xc3\xbf", b"\xff"))
    (corpus / "b.txt").write_text("seven\n\neight\n")
    for unit in (TextUnit.line, TextUnit.paragraph, TextUnit.document):
        runs = {}
        for streaming in (False, True):
            out = tmp_path / f"{unit.value}-{streaming}"
            # one tokenizer for both, so that only the documents can differ
            meta = prepare(text_config(tmp_path, [str(corpus)], dir=str(out), text_unit=unit, streaming=streaming,
                                       val_fraction=0.3, tokenizer_path=str(prepared_small / "tokenizer.model"))).meta
            runs[streaming] = sorted(decode_documents(out, "train") + decode_documents(out, "val")), meta["source"]
        assert runs[True] == runs[False], unit


def test_a_split_that_comes_out_empty_is_refused_and_leaves_nothing(tmp_path):
    write_text_corpus(tmp_path / "c", num_docs=20)
    assert not is_val_document(1234, 0, 20, 0.001).any()
    with pytest.raises(UserError, match=r"streaming put none of the 20 documents in the val split .*"
                                        r"data.val_fraction=0.001") as err:
        prepare(text_config(tmp_path, [str(tmp_path / "c")], streaming=True, val_fraction=0.001))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_max_documents_and_a_streamed_folder_is_not_the_non_streaming_one(tmp_path):
    cfg = small_data_config(tmp_path / "d", streaming=True, max_documents=40, vocab_size=512)
    meta = prepare(cfg).meta
    assert meta["source"]["documents"] == 40
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert prepare(cfg).skipped
    with pytest.raises(UserError, match=r"prepared with another config .*streaming: True -> False"):
        prepare(small_data_config(tmp_path / "d", max_documents=40, vocab_size=512))


def test_a_record_without_text_is_named(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a"}, {"body": "b"}]))
    with pytest.raises(UserError, match="json column 'text' holds NoneType, not text"):
        prepare(text_config(tmp_path, [str(tmp_path / "c")], streaming=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_keyed_uniform_is_per_index():
    u = keyed_uniform((7,), np.arange(10_000))
    assert np.array_equal(keyed_uniform((7,), np.arange(5_000, 6_000)), u[5_000:6_000])
    assert keyed_uniform(7, 42) == u[42] and 0.0 <= u.min() and u.max() < 1.0
    assert abs(float((u < 0.1).mean()) - 0.1) < 0.01
    assert not np.array_equal(keyed_uniform((8,), np.arange(100)), u[:100])
