"""A damaged prepared folder, and a corpus of binary files, through the real commands: one line naming the shard and
what was found, exit 2, no traceback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, small_data_config

pytestmark = pytest.mark.slow  # every test here starts the CLI

TRAIN = ["model=tiny", "train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4",
         "train.eval_every=1", "train.eval_windows=4", "train.checkpoint_every=0"]
REPREPARE = "re-prepare with data.overwrite=true"


def refused(proc: subprocess.CompletedProcess, command: str, pattern: str) -> str:
    """The one error line of a refused command (exit 2, no traceback), matched against ``pattern``."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"{command}: error: {pattern}", last), last
    return last


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    """A small prepared folder whose training tokens are all in train_000.bin."""
    from llmtrain.data.prepare import prepare

    folder = tmp_path_factory.mktemp("integrity") / "one"
    prepare(small_data_config(folder, max_documents=40, vocab_size=512, shard_tokens=1 << 26))
    assert not (folder / "train_001.bin").exists()
    return folder


@pytest.fixture
def copy(one_shard, tmp_path) -> Path:
    return Path(shutil.copytree(one_shard, tmp_path / "data"))


def test_out_of_vocabulary_ids_stop_training_naming_the_shard_and_offset(copy, tmp_path):
    ids = np.memmap(copy / "train_000.bin", dtype=np.uint16, mode="r+")
    ids[1000:] = 60_000  # the size is kept; every window after the first few holds them
    ids.flush()
    proc = run_cli("llmtrain-train", f"data.dir={copy}", f"run.dir={tmp_path}/run", *TRAIN)
    refused(proc, "llmtrain-train", rf"{copy}/train_000.bin holds token id 60000 at token [\d,]+, outside the "
                                    rf"vocabulary of 512 in meta.json: the shard changed after it was prepared; "
                                    rf"{REPREPARE}")
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint: no folder of only a config left


def test_a_flipped_byte_fails_verify_in_both_commands(copy, tmp_path):
    with open(copy / "train_000.bin", "r+b") as f:
        f.seek(4321)
        byte = f.read(1)[0]
        f.seek(4321)
        f.write(bytes([byte ^ 1]))
    fails = rf"{copy}/train_000.bin fails its checksum \(blake2b [0-9a-f]{{16}}, meta.json says [0-9a-f]{{16}}\): " \
            rf"the file changed after it was prepared; {REPREPARE}"
    refused(run_cli("llmtrain-prepare", f"data.dir={copy}", "verify=true"), "llmtrain-prepare", fails)
    refused(run_cli("llmtrain-train", f"data.dir={copy}", f"run.dir={tmp_path}/run", *TRAIN, "data.verify=true"),
            "llmtrain-train", fails)


def test_verify_of_an_intact_folder_is_one_line_and_exit_0(one_shard):
    proc = run_cli("llmtrain-prepare", f"data.dir={one_shard}", "verify=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(rf"{one_shard}: 2 shards, [\d,]+ tokens: every size, token id and blake2b checksum matches "
                        r"meta.json \([\d.]+ s\)\n", proc.stdout), proc.stdout


def test_a_token_count_in_meta_smaller_than_the_file_says_both_numbers(copy, tmp_path):
    meta = json.loads((copy / "meta.json").read_text())
    shard = meta["splits"]["train"]["shards"][0]
    real = shard["tokens"]
    shard["tokens"] = real - 1000
    (copy / "meta.json").write_text(json.dumps(meta))
    proc = run_cli("llmtrain-train", f"data.dir={copy}", f"run.dir={tmp_path}/run", *TRAIN)
    refused(proc, "llmtrain-train", rf"{copy}/train_000.bin holds {real:,} tokens, meta.json says {real - 1000:,}: "
                                    rf"the shard or meta.json changed after it was prepared; {REPREPARE}")


def test_a_folder_of_binary_files_is_refused_and_accepted_when_allowed(tmp_path):
    corpus = tmp_path / "blobs"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (corpus / f"blob{i}.bin").write_bytes(rng.integers(0, 256, size=4000, dtype=np.uint8).tobytes())
    args = ["data=text", f"data.paths=[{corpus}]", f"data.dir={tmp_path}/out", "data.vocab_size=2048"]
    refused(run_cli("llmtrain-prepare", *args), "llmtrain-prepare",
            r"6 of 6 files, 100% of the corpus's 24,000 bytes \(e.g. .*blob\d.bin\), are not UTF-8 text \(an invalid "
            r"sequence per 10 bytes or more: binary data, or another encoding\), and a corpus more than half such is "
            r"refused; name UTF-8 text files in data.paths, or pass data.allow_invalid_utf8=true to prepare them "
            r"anyway \(each invalid sequence replaced by U\+FFFD\)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]
    proc = run_cli("llmtrain-prepare", *args, "data.allow_invalid_utf8=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 file(s) held invalid UTF-8" in proc.stderr and (tmp_path / "out" / "meta.json").is_file()
