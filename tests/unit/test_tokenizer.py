"""The sentencepiece tokenizer round-trips any UTF-8 text exactly."""

from __future__ import annotations

import random

import pytest

from llmtrain.data.reader import PreparedData
from llmtrain.data.sources import stdlib_files
from llmtrain.data.tokenizer import EOD_PIECE, Tokenizer
from llmtrain.errors import UserError

ODD_TEXTS = [
    "日本語のテキストと中文字符，한국어 문장도。",
    "emoji 🎉🙂👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin tones 👍🏽",
    "  leading spaces,\ttabs\t\tand trailing   \n\n\n",
    "windows\r\nline\r\nends and a lone \r carriage return",
    "non-breaking\u00a0space, zero-width\u200bjoiner, BOM \ufeff, replacement \ufffd",
    "control chars \x00\x01\x1f and del \x7f",
    "math ∀x∈ℝ: x² ≥ 0, arrows ⟶, combining e\u0301 vs é",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tokenizer(prepared_small) -> Tokenizer:
    return PreparedData(prepared_small).tokenizer()


def test_random_stdlib_files_round_trip(tokenizer):
    files = random.Random(0).sample(stdlib_files(), 40)
    checked = 0
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, path
        assert tokenizer.eod_id not in ids
        checked += 1
    assert checked == 40


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_batch_encoding_equals_single(tokenizer):
    assert tokenizer.encode_batch(ODD_TEXTS, num_threads=2) == [tokenizer.encode(t) for t in ODD_TEXTS]


def test_special_ids_and_size(tokenizer):
    assert tokenizer.vocab_size == 1024
    assert tokenizer.eod_id == 1 and tokenizer.sp.id_to_piece(1) == EOD_PIECE
    assert tokenizer.encode("\n") == [tokenizer.sp.piece_to_id("\n")]
    # code compresses: well under one token per byte on Python source
    text = stdlib_files()[0].read_text()
    assert len(tokenizer.encode(text)) < 0.6 * len(text.encode())


def test_fingerprint_tracks_the_model(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t.model")
    again = Tokenizer.load(tmp_path / "t.model")
    assert again.fingerprint == tokenizer.fingerprint
    other = Tokenizer.train(["some text for a different model " * 20, "more words here"] * 5, vocab_size=300)
    assert other.fingerprint != tokenizer.fingerprint


def test_vocabulary_the_corpus_cannot_fill_is_refused():
    with pytest.raises(UserError, match=r"data.vocab_size=5000 is more than this corpus supports"):
        Tokenizer.train(["a tiny corpus", "of two documents"], vocab_size=5000)


def test_not_a_model_is_refused(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        Tokenizer.load(tmp_path / "bad.model")
