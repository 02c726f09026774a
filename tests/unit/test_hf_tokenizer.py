"""The exported Hugging Face tokenizer gives exactly our ids and decodes them back to the text."""

from __future__ import annotations

import random

import pytest

from llmtrain.data.shards import TOKENIZER_FILE
from llmtrain.data.sources import stdlib_files
from llmtrain.data.tokenizer import EOD_PIECE, Tokenizer
from llmtrain.errors import UserError
from llmtrain.export.hf_tokenizer import save_hf_tokenizer

transformers = pytest.importorskip("transformers")

TRICKY_TEXTS = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "    leading spaces",
    "trailing spaces   ",
    " " * 37 + "x" + " " * 64,
    "\tone tab\t\ttwo tabs\t \t mixed",
    "windows\r\nline\r\nends and a lone \r carriage return",
    "digits 12345 and 3.14159e-10, 0x7fff, 1_000_000",
    "日本語のテキストと中文字符，한국어 문장도。",
    "emoji 🎉🙂👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin tones 👍🏽",
    "control chars \x00\x01\x1f and del \x7f, escape \x1b[31m",
    "non-breaking\u00a0space, zero-width\u200bjoiner, BOM \ufeff, replacement \ufffd",
    "math ∀x∈ℝ: x² ≥ 0, combining e\u0301 vs é",
    # Text that looks like pieces must be spelled out, as sentencepiece does.
    f"{EOD_PIECE} <unk> <0x41> <0x0A>",
    "<0x41>",  # a whole line that is a piece: tokenizers' ignore_merges would look it up instead of merging
    "<unk>\n<|endoftext|>\n",
    "def f(x):\n    return x  # comment\n\n\nclass A:\n\tpass\n",
]


@pytest.fixture(scope="module")
def ours(prepared_small) -> Tokenizer:
    return Tokenizer.load(prepared_small / TOKENIZER_FILE)


@pytest.fixture(scope="module")
def exported(prepared_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    save_hf_tokenizer(prepared_small / TOKENIZER_FILE, folder)
    return folder


@pytest.fixture(scope="module")
def hf(exported):
    return transformers.AutoTokenizer.from_pretrained(str(exported))


def test_folder_loads_without_remote_code(exported, hf):
    assert sorted(p.name for p in exported.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)


def test_stdlib_files_encode_to_our_ids(ours, hf):
    files = random.Random(0).sample(stdlib_files(), 40)
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        ids = ours.encode(text)
        assert hf.encode(text) == ids, path
        assert hf.decode(ids) == text, path


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tricky_text_encodes_to_our_ids(ours, hf, text):
    ids = ours.encode(text)
    assert hf.encode(text) == ids
    assert hf(text).input_ids == ids  # the default call adds no special tokens either
    assert hf(text, add_special_tokens=False).input_ids == ids
    assert hf.decode(ids) == text


def test_random_snippets_with_rare_characters(ours, hf):
    """Slices of source cut anywhere, a fifth of their characters swapped for random code points (byte fallback)."""
    rng = random.Random(1)
    sources = [p.read_text(errors="replace") for p in random.Random(2).sample(stdlib_files(), 20)]
    sources = [s for s in sources if s]
    snippets = []
    for _ in range(2000):
        source = rng.choice(sources)
        start = rng.randrange(len(source))
        snippet = source[start:start + rng.randint(1, 120)]
        snippets.append("".join(c if rng.random() > 0.2 else _random_char(rng) for c in snippet))
    assert hf(snippets).input_ids == ours.encode_batch(snippets)
    assert hf.batch_decode(ours.encode_batch(snippets)) == snippets


def _random_char(rng: random.Random) -> str:
    while True:
        c = chr(rng.randrange(0x110000))
        if not 0xD800 <= ord(c) <= 0xDFFF and c != "\u2581":  # surrogates can't be encoded; "▁" decodes as " "
            return c


def test_special_tokens(ours, hf):
    assert hf.eos_token == EOD_PIECE and hf.eos_token_id == ours.eod_id == 1
    assert hf.unk_token_id == 0
    assert hf.bos_token_id is None and hf.pad_token_id is None
    assert len(hf) == ours.vocab_size
    ids = ours.encode("a b") + [ours.eod_id]
    assert hf.decode(ids, skip_special_tokens=True) == "a b"
    assert hf.decode(ids) == "a b" + EOD_PIECE


def test_unsupported_model_is_refused(prepared_small, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((prepared_small / TOKENIZER_FILE).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "prefix.model").write_bytes(proto.SerializeToString())
    with pytest.raises(UserError, match="add_dummy_prefix is on"):
        save_hf_tokenizer(tmp_path / "prefix.model", tmp_path / "out")
    (tmp_path / "bad.model").write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        save_hf_tokenizer(tmp_path / "bad.model", tmp_path / "out")
