"""Tokenizers, one interface, two backends chosen by the file: a sentencepiece ``.model`` (what llmtrain trains, and
what Llama-family folders ship as ``tokenizer.model``) or a Hugging Face ``tokenizer.json`` run by the `tokenizers`
library (GPT-2's byte-level BPE, and any other fast tokenizer). Either is identified by the SHA-256 of its file.

The sentencepiece tokenizer llmtrain trains round-trips any UTF-8 text exactly. Lossless settings: no normalization
(identity rule), no whitespace collapsing or dummy prefix, byte fallback for every character outside the vocabulary,
and newline as its own piece (sentencepiece otherwise treats input as single lines and would never learn it).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from llmtrain.errors import UserError

EOD_PIECE = "<|endoftext|>"
# unk=0, eod=1, "\n"=2, then 256 byte pieces: the smallest vocabulary that can hold anything.
NUM_RESERVED = 3 + 256
JSON_EOD_PIECES = (EOD_PIECE, "<|end_of_text|>", "</s>")
"""End-of-document tokens looked for, in this order, in a tokenizer.json (GPT-2, Llama 3, Llama 2 / Mistral)."""


def check_same_tokenizer(theirs: str, ours: str, their_owner: str, our_owner: str, fix: str) -> None:
    """The one tokenizer check: ``their_owner`` (a checkpoint, a dataset, a file) must have been made with the
    tokenizer of ``our_owner``, compared by fingerprint (the SHA-256 of the tokenizer file); else one line with
    ``fix``."""
    if theirs != ours:
        raise UserError(f"{their_owner} has another tokenizer than {our_owner} (sha256 {theirs[:12]} vs "
                        f"{ours[:12]}); {fix}")


class Tokenizer:
    """What llmtrain needs of a tokenizer: ids <-> text, the end-of-document id, the vocabulary size, and the file
    it was loaded from (saved into checkpoints and exports under ``file_name``)."""

    file_name = "tokenizer.model"
    """The name of its file in a prepared folder, a checkpoint or an export."""
    eod_id: int

    def __init__(self, data: bytes) -> None:
        self.data = data

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A ``.json`` file through `tokenizers`, anything else as a sentencepiece model."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path}")
        backend = JsonTokenizer if path.suffix == ".json" else SentencePieceTokenizer
        return backend(path.read_bytes(), source=str(path))

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int, model_type: str = "bpe",
              num_threads: int = 2) -> Tokenizer:
        """A sentencepiece model trained on ``documents`` (see ``SentencePieceTokenizer.train``)."""
        return SentencePieceTokenizer.train(documents, vocab_size, model_type, num_threads)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the file: two tokenizers are the same iff their fingerprints are."""
        return hashlib.sha256(self.data).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.data)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A loaded sentencepiece model."""

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        super().__init__(model_proto)
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:
            raise UserError(f"{source} is not a sentencepiece model ({exc})") from None
        self.eod_id = self.sp.piece_to_id(EOD_PIECE)
        if self.sp.id_to_piece(self.eod_id) != EOD_PIECE:
            # A foreign sentencepiece model: use its end-of-sentence id, which must exist.
            self.eod_id = self.sp.eos_id()
            if self.eod_id < 0:
                raise UserError(f"{source} has neither {EOD_PIECE!r} nor an eos id to separate documents")

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int, model_type: str = "bpe",
              num_threads: int = 2) -> SentencePieceTokenizer:
        """Train on ``documents`` (each one whole document); raises UserError if the text cannot fill the vocab."""
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(documents),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                character_coverage=0.9995,
                max_sentence_length=1 << 20,
                unk_id=0,
                eos_id=1,
                bos_id=-1,
                pad_id=-1,
                eos_piece=EOD_PIECE,
                user_defined_symbols=["\n"],
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[-1]
            limit = re.search(r"Vocabulary size too high .*<= (\d+)", msg)
            if limit:
                raise UserError(f"data.vocab_size={vocab_size} is more than this corpus supports (at most "
                                f"{limit.group(1)}); lower data.vocab_size or add documents") from None
            chars = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
            if chars:
                raise UserError(f"data.vocab_size={vocab_size} is too small: the corpus needs {chars.group(2)} "
                                "pieces for its characters and special tokens; raise data.vocab_size") from None
            raise UserError(f"sentencepiece training failed: {msg}") from None
        return SentencePieceTokenizer(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


class JsonTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, run by the `tokenizers` library (a transformers fast tokenizer's backend).

    Nothing is added on encode (no BOS from a post-processor), and special tokens written in the text are encoded as
    text, as sentencepiece does: a document that contains "<|endoftext|>" does not end there."""

    file_name = "tokenizer.json"

    def __init__(self, data: bytes, source: str = "<memory>") -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise UserError(f"{source} needs the tokenizers library: pip install 'llmtrain[hf]'") from None
        super().__init__(data)
        try:
            self.backend = Backend.from_str(data.decode("utf-8"))
        except Exception as exc:
            raise UserError(f"{source} is not a tokenizers tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
        self.backend.encode_special_tokens = True
        ids = [self.backend.token_to_id(piece) for piece in JSON_EOD_PIECES]
        found = [i for i in ids if i is not None]
        if not found:
            raise UserError(f"{source} has none of {', '.join(JSON_EOD_PIECES)} to separate documents")
        self.eod_id = found[0]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """``num_threads`` is not used: `tokenizers` sizes its own thread pool (RAYON_NUM_THREADS)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)
