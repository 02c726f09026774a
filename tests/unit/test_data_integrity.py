"""A prepared folder checks itself: meta.json records each shard's checksum and largest token id as it is written,
sizes are checked (both ways) when a split opens, verify reads every byte, a batch refuses token ids outside the
vocabulary, and a corpus that is mostly binary is refused unless allowed."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmtrain.data.prepare import prepare
from llmtrain.data.reader import PreparedData
from llmtrain.data.shards import CHECKSUM, MAX_ID, SPLITS, ShardWriter, read_meta, verify_shards
from llmtrain.data.sources import CorpusStats, check_mostly_text
from llmtrain.errors import UserError
from llmtrain.run import setup
from tests.conftest import small_data_config
from tests.unit.test_prepare import text_config, write_text_corpus
from tests.unit.test_prepare_tasks import run_phases

REPREPARE = "re-prepare with data.overwrite=true"


@pytest.fixture
def folder(prepared_small, tmp_path) -> Path:
    """A copy of the small prepared folder (150 documents, 50,000-token shards, vocabulary 1024) to damage."""
    return Path(shutil.copytree(prepared_small, tmp_path / "d"))


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def strip_checksums(meta: dict) -> None:
    """meta.json as prepared before checksums and largest ids were recorded."""
    meta.pop(MAX_ID)
    for split in meta["splits"].values():
        for shard in split["shards"]:
            del shard[CHECKSUM], shard[MAX_ID]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))  # the low bit of a uint16's low byte: the id stays below 1024


def assert_checksums_match_files(folder: Path) -> None:
    meta = read_meta(folder)
    largest = []
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            raw = (folder / shard["file"]).read_bytes()
            assert shard[CHECKSUM] == hashlib.blake2b(raw, digest_size=32).hexdigest(), shard["file"]
            assert shard[MAX_ID] == np.frombuffer(raw, dtype=meta["dtype"]).max(), shard["file"]
            largest.append(shard[MAX_ID])
    assert meta[MAX_ID] == max(largest) < meta["vocab_size"]


# ---- what meta.json records -------------------------------------------------------------------------------------


def test_meta_records_each_shards_checksum_and_largest_id(prepared_small):
    assert len(read_meta(prepared_small)["splits"]["train"]["shards"]) > 3
    assert_checksums_match_files(prepared_small)


def test_the_writer_hashes_across_writes_and_shard_boundaries(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=1000)
    rng = np.random.default_rng(0)
    for size in (1, 999, 2500, 0, 7):
        writer.write(rng.integers(0, 500, size=size))
    writer.write(np.array([40_000, 3, 2][::-1]))  # a strided view: written and hashed as its values
    writer.close()
    shards = writer.summary()["shards"]
    assert [s["tokens"] for s in shards] == [1000, 1000, 1000, 510]
    for shard in shards:
        raw = (tmp_path / shard["file"]).read_bytes()
        assert shard[CHECKSUM] == hashlib.blake2b(raw, digest_size=32).hexdigest()
        assert shard[MAX_ID] == np.frombuffer(raw, dtype=np.uint16).max()
    assert shards[-1][MAX_ID] == 40_000


def test_a_streamed_folder_records_checksums(tmp_path):
    report = prepare(small_data_config(tmp_path / "s", streaming=True, max_documents=40, vocab_size=512,
                                       shard_tokens=20_000))
    assert_checksums_match_files(report.data_dir)


def test_the_merge_checks_each_task_shard_as_it_copies_it(tmp_path, monkeypatch):
    from llmtrain.data import tasks

    merge = tasks.merge

    def flip_then_merge(cfg, target, work):
        flip_byte(tasks.task_folder(work, 1) / "train_000.bin", 10)
        return merge(cfg, target, work)

    monkeypatch.setattr(tasks, "merge", flip_then_merge)
    with pytest.raises(UserError, match=r"task_1/train_000.bin fails its checksum \(blake2b\): it changed after "
                                        r"its task wrote it; delete .*task_1 and run data.task=1 again"):
        run_phases(tmp_path / "m", 2, max_documents=30, vocab_size=512)
    assert not (tmp_path / "m").exists()


# ---- sizes, when a split opens ----------------------------------------------------------------------------------


def test_sizes_are_checked_both_ways_and_say_both_counts(folder):
    shard = folder / "train_000.bin"
    original = shard.read_bytes()
    shard.write_bytes(original + b"\0\0" * 10)
    with pytest.raises(UserError, match=rf"^{folder}/train_000.bin holds 50,010 tokens, meta.json says 50,000: the "
                                        rf"shard or meta.json changed after it was prepared; {REPREPARE}$"):
        PreparedData(folder).check_sizes()  # what the run set-up calls, before a model is built
    shard.write_bytes(original[:2000])
    with pytest.raises(UserError, match="train_000.bin holds 1,000 tokens, meta.json says 50,000: "):
        PreparedData(folder).split("train")
    shard.write_bytes(original[:2001])
    with pytest.raises(UserError, match=r"train_000.bin holds 2,001 bytes, not a whole number of uint16 tokens "
                                        r"\(meta.json says 50,000 tokens\)"):
        PreparedData(folder).split("train")
    shard.write_bytes(original)
    edit_meta(folder, lambda meta: meta["splits"]["train"]["shards"][0].update(tokens=40_000))
    with pytest.raises(UserError, match="train_000.bin holds 50,000 tokens, meta.json says 40,000: "):
        PreparedData(folder).split("train")
    shard.unlink()
    with pytest.raises(UserError, match=rf"train_000.bin is missing \(meta.json lists it with 40,000 tokens\); "
                                        rf"{REPREPARE}$"):
        PreparedData(folder).split("train")


# ---- verify: every byte -----------------------------------------------------------------------------------------


def test_verify_passes_an_intact_folder_and_names_the_first_shard_that_fails(folder):
    (report,) = PreparedData(folder).verify()
    assert report.unchecked == 0 and report.shards == len(list(folder.glob("*.bin")))
    assert "tokens: every size, token id and blake2b checksum matches meta.json" in report.line()
    flip_byte(folder / "val_000.bin", 3)
    flip_byte(folder / "train_001.bin", 777)
    with pytest.raises(UserError, match=rf"^{folder}/train_001.bin fails its checksum \(blake2b [0-9a-f]{{16}}, "
                                        rf"meta.json says [0-9a-f]{{16}}\): the file changed after it was "
                                        rf"prepared; {REPREPARE}$"):
        PreparedData(folder).verify()
    PreparedData(folder).split("train")  # the size is kept: opening (and training) does not read every byte


def test_verify_checks_the_tokenizer_file(folder):
    with open(folder / "tokenizer.model", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match=rf"^{folder}/tokenizer.model is not a sentencepiece model"):
        PreparedData(folder).verify()


def test_a_folder_prepared_before_checksums_still_opens_and_verify_says_what_it_could_not_check(folder):
    edit_meta(folder, strip_checksums)
    data = PreparedData(folder)
    data.split("train")
    data.check_token_ids(1024)
    (report,) = data.verify()
    assert report.unchecked == report.shards
    assert report.line().endswith(f"tokens: sizes and token ids ok, but this folder records no checksums (it was "
                                  f"prepared before they were recorded), so changed bytes go unnoticed; {REPREPARE} "
                                  "to get them")
    ids = np.memmap(folder / "val_000.bin", dtype=np.uint16, mode="r+")
    ids[1234] = 1024
    ids.flush()
    with pytest.raises(UserError, match=r"val_000.bin holds token id 1024 at token 1,234, outside the vocabulary "
                                        r"of 1,024 in meta.json: the shard changed after it was prepared; "):
        verify_shards(folder, data.meta)


def test_data_verify_in_the_run_set_up_logs_the_result_or_refuses(folder, caplog):
    with caplog.at_level(logging.INFO, logger="llmtrain"):
        setup.verify_data(PreparedData(folder), is_main=True)
    assert "data.verify=true: " in caplog.text and "blake2b checksum matches" in caplog.text
    flip_byte(folder / "train_000.bin", 0)
    with pytest.raises(UserError, match="train_000.bin fails its checksum"):
        setup.verify_data(PreparedData(folder), is_main=False)


def test_overwrite_prepares_a_folder_with_the_same_config_again(tmp_path):
    cfg = small_data_config(tmp_path / "d", max_documents=20, vocab_size=512)
    prepare(cfg)
    edit_meta(tmp_path / "d", strip_checksums)
    assert prepare(cfg).skipped
    cfg.overwrite = True
    report = prepare(cfg)
    assert not report.skipped
    assert_checksums_match_files(tmp_path / "d")


# ---- token ids outside the vocabulary ---------------------------------------------------------------------------


def test_an_out_of_vocabulary_id_in_a_batch_names_the_shard_and_offset(folder):
    ids = np.memmap(folder / "train_002.bin", dtype=np.uint16, mode="r+")
    ids[12_345] = 5000
    ids.flush()
    del ids
    reader = PreparedData(folder).train_reader(64, seed=1, rank=0, world_size=1)
    message = (rf"^{folder}/train_002.bin holds token id 5000 at token 12,345, outside the vocabulary of 1,024 in "
               rf"meta.json: the shard changed after it was prepared; {REPREPARE}$")
    with pytest.raises(UserError, match=message):
        for _ in range(reader.num_windows // 256 + 1):  # one epoch: the window that holds it comes
            reader.next_batch(256)
    # the id as a target only (the last token of a window, the first of the next): still named
    ids = np.memmap(folder / "train_002.bin", dtype=np.uint16, mode="r+")
    ids[12_345], ids[64 * 3] = 7, 4000
    ids.flush()
    index = PreparedData(folder).train_reader(64, seed=1, rank=0, world_size=1).index
    first = int(index._first[2])
    with pytest.raises(UserError, match="train_002.bin holds token id 4000 at token 192, "):
        index.gather(np.array([first + 2]))


def test_the_recorded_largest_id_is_checked_against_the_model_vocabulary(prepared_small, folder):
    PreparedData(prepared_small).check_token_ids(1024)
    largest = read_meta(prepared_small)[MAX_ID]
    with pytest.raises(UserError, match=rf"^{prepared_small}/meta.json records token ids up to {largest} \(in "
                                        rf"(train|val)_\d+.bin\), outside the model's vocabulary of 1,000: "):
        PreparedData(prepared_small).check_token_ids(1000)


# ---- a corpus of binary files -----------------------------------------------------------------------------------


def write_binary_files(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"blob{i}.bin").write_bytes(rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("streaming", [False, True])
def test_a_corpus_mostly_of_binary_files_is_refused_unless_allowed(tmp_path, caplog, streaming):
    corpus = tmp_path / "c"
    write_binary_files(corpus, 6, 4000)
    (corpus / "readme.txt").write_text("some text " * 100)
    with pytest.raises(UserError, match=r"^6 of 7 files, 96% of the corpus's 25,000 bytes \(e.g. .*blob\d.bin\), "
                                        r"are not UTF-8 text .* pass data.allow_invalid_utf8=true ") as err:
        prepare(text_config(tmp_path, [str(corpus)], vocab_size=2048, streaming=streaming, val_fraction=0.5))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing written, nothing half-written
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        meta = prepare(text_config(tmp_path, [str(corpus)], vocab_size=2048, streaming=streaming, val_fraction=0.5,
                                   allow_invalid_utf8=True)).meta
    assert "6 file(s) held invalid UTF-8" in caplog.text
    assert meta["source"]["binary_bytes"] == 24_000


def test_a_few_binary_files_among_text_files_only_warn(tmp_path, caplog):
    corpus = tmp_path / "c"
    write_text_corpus(corpus, num_docs=30)
    write_binary_files(corpus / "assets", 2, 300)
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        meta = prepare(text_config(tmp_path, [str(corpus)], vocab_size=700)).meta
    assert "2 file(s) held invalid UTF-8" in caplog.text
    assert sorted(Path(p).name for p in meta["source"]["binary_files"]) == ["blob0.bin", "blob1.bin"]


def test_the_binary_rule():
    stats = CorpusStats(files=3)
    stats.add_invalid("text_with_a_stray_byte.txt", 1000, 3)  # fewer than one invalid sequence per 10 bytes: text
    stats.add_invalid("blob.bin", 600, 250)
    assert stats.binary_files == ["blob.bin"] and stats.binary_bytes == 600
    check_mostly_text(stats, file_bytes=1200, allow=False)  # half: warned about, prepared
    with pytest.raises(UserError, match=r"^1 of 3 files, 50% of the corpus's 1,199 bytes \(e.g. blob.bin\)"):
        check_mostly_text(stats, file_bytes=1199, allow=False)
    check_mostly_text(stats, file_bytes=1199, allow=True)
