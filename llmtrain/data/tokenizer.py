"""The sentencepiece tokenizer: trained so that any UTF-8 text round-trips exactly, with an end-of-document id.

Lossless settings: no normalization (identity rule), no whitespace collapsing or dummy prefix, byte fallback
for every character outside the vocabulary, and newline as its own piece (sentencepiece otherwise treats
input as single lines and would never learn it).
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


class Tokenizer:
    """A loaded sentencepiece model with the ids llmtrain needs."""

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
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
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int, model_type: str = "bpe",
              num_threads: int = 2) -> Tokenizer:
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
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the serialized model: two tokenizers are the same iff their fingerprints are."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))
