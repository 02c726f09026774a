"""Our sentencepiece tokenizer as a Hugging Face tokenizer folder that ``AutoTokenizer.from_pretrained`` loads.

The folder holds a ``tokenizer.json`` (a `tokenizers` pipeline) and a ``tokenizer_config.json``; no remote code.
It encodes to the same ids as `llmtrain.data.tokenizer.Tokenizer.encode` and decodes them back to the text:

- normalizer: only " " -> "▁" (U+2581). The model uses the identity rule, no dummy prefix and no whitespace
  collapsing, so escaping spaces is all sentencepiece does to the text before encoding.
- pre-tokenizer: each user-defined piece ("\\n") is cut out as its own word, because sentencepiece emits those
  whole and never merges them. Nothing else is split: sentencepiece's ``split_by_whitespace`` /
  ``split_by_unicode_script`` / ``split_by_number`` / ``split_digits`` only constrain which pieces *training*
  may create; at encoding time BPE merges over the whole text, and a merge exists only if its result is a piece.
- model: BPE over every piece, with a merge for each way of splitting a normal piece into two normal pieces,
  ranked by the piece's score (its training rank), as sentencepiece picks the best-scoring adjacent pair.
  ``ignore_merges`` stays off: with it, a word that happens to be a piece (the text "<0x41>", say) would be looked
  up whole, where sentencepiece spells it out. ``byte_fallback`` emits the <0xNN> pieces for unknown characters.
- decoder: "▁" -> " ", byte pieces -> bytes -> UTF-8, then joined.
- nothing is added on encode (no special tokens in the post-processor), and ``split_special_tokens`` is on, so
  the literal text "<|endoftext|>" is spelled out as sentencepiece does; the end-of-text id is
  ``tokenizer.eos_token_id``. Loading needs transformers>=4.45 (tokenizers>=0.20), as does exporting.

One difference remains by design of the two libraries: when two *different* merges give the same piece at
overlapping positions (pieces X, Y, Z with X+Y == Y+Z), sentencepiece merges the leftmost while `tokenizers`
takes the merge listed first. Over the whole standard library no text was found where this happens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmtrain.data.tokenizer import EOD_PIECE, JsonTokenizer
from llmtrain.errors import UserError

# sentencepiece's ModelProto.SentencePiece.Type
_NORMAL, _USER_DEFINED, _BYTE = 1, 4, 6
_SPACE = "\u2581"


def save_hf_tokenizer(sp_model_path: str | Path, out_dir: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map if needed) so AutoTokenizer loads it."""
    try:
        import transformers
        from packaging.version import Version
    except ImportError:
        raise UserError("exporting the tokenizer needs transformers: pip install 'transformers>=4.45'") from None
    # 4.45 (tokenizers 0.20) is the first to honour split_special_tokens in fast tokenizers and to write merges as
    # pairs; older versions would export a tokenizer that reads "<|endoftext|>" in the text as the eos id.
    if Version(transformers.__version__) < Version("4.45"):
        raise UserError(f"exporting the tokenizer needs transformers>=4.45, found {transformers.__version__}")

    proto = _load_proto(Path(sp_model_path))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(proto),
        unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
        eos_token=_eos_piece(proto),
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 names its class "TokenizersBackend"; "PreTrainedTokenizerFast" is what 4.x knows and 5.x
    # still accepts as an alias, so the folder loads with either.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_json_tokenizer(tokenizer: JsonTokenizer, out_dir: str | Path) -> None:
    """The tokenizer_config.json (+ special_tokens_map) that makes AutoTokenizer load a ``tokenizer.json`` as
    llmtrain encodes with it: nothing added, special tokens in the text spelled out, eos = the end-of-document token.
    The tokenizer.json keeps its bytes, so the folder's tokenizer has the fingerprint the model was trained with."""
    import transformers

    out_dir = Path(out_dir)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(out_dir / tokenizer.file_name),
        eos_token=tokenizer.backend.id_to_token(tokenizer.eod_id),
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    hf.save_pretrained(str(out_dir))
    tokenizer.save(out_dir / tokenizer.file_name)  # save_pretrained re-serialized it
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # as in save_hf_tokenizer: loads with 4.x and 5.x
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _build_backend(proto):
    """The `tokenizers.Tokenizer` that encodes like sentencepiece's BPE ``proto`` (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
    model = models.BPE(vocab=vocab, merges=_merges(pieces), unk_token=pieces[proto.trainer_spec.unk_id].piece,
                       fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback, ignore_merges=False)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    if user_defined:
        # Longest first, as sentencepiece's prefix matcher prefers the longest user-defined piece.
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def _merges(pieces) -> list[tuple[str, str]]:
    """Every (left, right) of normal pieces whose concatenation is a normal piece, best-scoring result first."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, cut, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _load_proto(path: Path):
    # The protobuf classes ship with sentencepiece; they need the `protobuf` package (a dependency of wandb).
    from sentencepiece import sentencepiece_model_pb2

    if not path.is_file():
        raise UserError(f"tokenizer model not found: {path}")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise UserError(f"{path} is not a sentencepiece model ({exc})") from None
    _check_supported(proto, path)
    return proto


def _check_supported(proto, path: Path) -> None:
    """Refuse models whose encoding the pipeline above would not reproduce, rather than export a wrong tokenizer."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != trainer.BPE:
        problems.append("model_type is not BPE")
    if norm.precompiled_charsmap:
        problems.append(f"normalization rule {norm.name!r} is not identity")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix is on")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix:
        problems.append("whitespace is not escaped as a '▁' prefix")
    if proto.denormalizer_spec.precompiled_charsmap:
        problems.append("it has a denormalizer")
    if trainer.byte_fallback and sum(p.type == _BYTE for p in proto.pieces) != 256:
        problems.append("byte_fallback is on but the 256 byte pieces are not all there")
    if problems:
        raise UserError(f"cannot export {path} to Hugging Face format: {'; '.join(problems)}")


def _eos_piece(proto) -> str:
    """The end-of-document piece, found as `Tokenizer` finds it: "<|endoftext|>" or else the model's eos."""
    for piece in proto.pieces:
        if piece.piece == EOD_PIECE:
            return EOD_PIECE
    if proto.trainer_spec.eos_id < 0:
        raise UserError(f"the tokenizer has neither {EOD_PIECE!r} nor an eos id")
    return proto.pieces[proto.trainer_spec.eos_id].piece
