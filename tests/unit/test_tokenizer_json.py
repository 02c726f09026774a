"""The second tokenizer backend: a Hugging Face tokenizer.json (here a GPT-2-style byte-level BPE that the
`tokenizers` library trained) behind the same Tokenizer interface, and llmtrain-prepare with it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from llmtrain.data.prepare import prepare
from llmtrain.data.reader import PreparedData
from llmtrain.data.tokenizer import JsonTokenizer, SentencePieceTokenizer, Tokenizer
from llmtrain.errors import UserError
from tests.conftest import small_data_config
from tests.hf_models import save_byte_level_bpe

transformers = pytest.importorskip("transformers")
TEXTS = ["def f(x):\n    return x  # comment\n", "héllo wörld 日本語 🙂\n\n\tindented", "  two  spaces  ", "a" * 300]


@pytest.fixture(scope="module")
def json_file(tmp_path_factory):
    return save_byte_level_bpe(tmp_path_factory.mktemp("bpe"))


def test_loaded_by_its_file_with_the_same_rules(json_file, prepared_small):
    tok = Tokenizer.load(json_file)
    assert isinstance(tok, JsonTokenizer) and tok.file_name == "tokenizer.json"
    assert isinstance(Tokenizer.load(prepared_small / "tokenizer.model"), SentencePieceTokenizer)
    assert tok.fingerprint == hashlib.sha256(json_file.read_bytes()).hexdigest()
    assert tok.eod_id == tok.backend.token_to_id("<|endoftext|>") and tok.vocab_size <= 1000


def test_encodes_as_transformers_and_round_trips(json_file):
    tok = Tokenizer.load(json_file)
    theirs = transformers.AutoTokenizer.from_pretrained(json_file.parent)
    for text in TEXTS:
        assert tok.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_special_tokens_in_the_text_are_text(json_file):
    tok = Tokenizer.load(json_file)
    ids = tok.encode("end <|endoftext|> here")
    assert tok.eod_id not in ids and tok.decode(ids) == "end <|endoftext|> here"


def test_prepare_with_a_tokenizer_json(json_file, prepared_small, tmp_path):
    cfg = small_data_config(tmp_path / "data", max_documents=40, tokenizer_path=str(json_file))
    prepare(cfg)
    data = PreparedData(tmp_path / "data")
    tok = data.tokenizer()
    assert isinstance(tok, JsonTokenizer) and data.tokenizer_file.name == "tokenizer.json"
    assert data.meta["tokenizer"] == {"file": "tokenizer.json", "sha256": hashlib.sha256(json_file.read_bytes())
                                      .hexdigest()}
    assert data.vocab_size == tok.vocab_size
    val = np.concatenate([np.asarray(s) for s in data.split("val").shards])
    first = val[: int(np.flatnonzero(val == tok.eod_id)[0])]
    assert len(first) > 10 and "\n" in tok.decode(first.tolist())  # a whole stdlib document, decoded
    assert prepare(cfg).skipped  # the same tokenizer file: nothing to do
    other = small_data_config(tmp_path / "data", max_documents=40,
                              tokenizer_path=str(prepared_small / "tokenizer.model"))
    with pytest.raises(UserError, match="was prepared with another config or tokenizer"):
        prepare(other)


def test_a_json_that_is_not_a_tokenizer_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="is not a tokenizers tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_prepare_as_tasks_with_a_tokenizer_json(json_file, tmp_path):
    """The plan keeps the tokenizer under its own name; tasks and the merge use it: the one-process result."""
    one = tmp_path / "one"
    prepare(small_data_config(one, max_documents=40, tokenizer_path=str(json_file)))
    for task in ["plan", "1", "0", "merge"]:
        prepare(small_data_config(tmp_path / "tasks", max_documents=40, tokenizer_path=str(json_file), num_tasks=2,
                                  task=task))
    merged = PreparedData(tmp_path / "tasks")
    assert merged.meta["tokenizer"] == PreparedData(one).meta["tokenizer"]
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == sorted(p.name for p in one.iterdir())
    for shard in one.glob("*.bin"):
        assert shard.read_bytes() == (tmp_path / "tasks" / shard.name).read_bytes()
