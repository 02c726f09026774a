"""The set-up both training modes share (run/setup.py) and the run folder's one owner (run/rundir.py):
the vocabulary check, the resume rule with its mode, the atomic completion marker, pruning."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from llmtrain.config import Mode, ModelConfig, TrainConfig, to_plain
from llmtrain.errors import UserError
from llmtrain.run import setup
from llmtrain.run.checkpoint import check_resumable, finish_checkpoint
from llmtrain.run.rundir import MARKER, STATE, RunDir, damage, read_marker
from llmtrain.run.trained import load_trained

SHA = "ab" * 32
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300)


@dataclass
class FakeData:
    """What the set-up functions read of a PreparedData."""

    vocab_size: int = 300
    tokenizer_fingerprint: str = "ab" * 32
    folder: Path = Path("data/fake")


def saved_checkpoint(run: RunDir, step: int, mode: str | None, model: ModelConfig = MODEL) -> Path:
    folder = run.checkpoint(step)
    folder.mkdir(parents=True)
    marker = {"step": step, **({"mode": mode} if mode else {})}
    state = {"step": step, "tokens_seen": 0, "tokenizer_sha256": FakeData().tokenizer_fingerprint,
             "model": to_plain(model), "seed": 1}
    finish_checkpoint(folder, "precision: fp32\n", state, marker)
    return folder


def test_vocabulary_comes_from_the_data_and_a_mismatch_is_refused():
    cfg = TrainConfig(model=replace(MODEL, vocab_size=0))
    assert setup.model_config(cfg, FakeData()).vocab_size == 300
    with pytest.raises(UserError, match="model.vocab_size=512 but the tokenizer of"):
        setup.model_config(TrainConfig(model=replace(MODEL, vocab_size=512)), FakeData())


@pytest.mark.parametrize("mode", [Mode.sync, Mode.async_ps])
def test_one_resume_rule_for_both_modes(tmp_path, mode):
    run = RunDir.of(tmp_path / "run")
    folder = saved_checkpoint(run, 10, mode.value)
    # the name and dropout may change on resume, in either mode
    state = check_resumable(folder, mode, SHA, replace(MODEL, name="renamed", dropout=0.1))
    assert state["step"] == 10
    with pytest.raises(UserError, match=r"another model shape \(n_layer: 2 -> 3\)"):
        check_resumable(folder, mode, SHA, replace(MODEL, n_layer=3))
    with pytest.raises(UserError, match="another tokenizer"):
        check_resumable(folder, mode, "cd" * 32, MODEL)


def test_a_checkpoint_of_the_other_mode_is_named_as_such(tmp_path):
    ps_folder = saved_checkpoint(RunDir.of(tmp_path / "ps"), 4, "async_ps")
    with pytest.raises(UserError, match="was saved by mode=async_ps and this run has mode=sync; resume it with "
                                        "mode=async_ps"):
        check_resumable(ps_folder, Mode.sync, SHA, MODEL)
    sync_folder = saved_checkpoint(RunDir.of(tmp_path / "sync"), 4, "sync")
    with pytest.raises(UserError, match="was saved by mode=sync and this run has mode=async_ps"):
        check_resumable(sync_folder, Mode.async_ps, SHA, MODEL)
    # checkpoints written before the marker named its mode were all synchronous
    old = saved_checkpoint(RunDir.of(tmp_path / "old"), 4, None)
    assert read_marker(old)["mode"] == "sync"
    assert check_resumable(old, Mode.sync, SHA, MODEL)["step"] == 4


def test_the_marker_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    run = RunDir.of(tmp_path / "run")
    folder = saved_checkpoint(run, 1, "sync")
    marker = json.loads((folder / MARKER).read_text())
    assert (marker["step"], marker["mode"], sorted(marker["files"])) == (1, "sync", ["config.yaml", STATE])
    assert marker["files"][STATE] == (folder / STATE).stat().st_size
    assert not (folder / (MARKER + ".tmp")).exists() and (folder / STATE).is_file()
    assert run.complete() == [(1, folder)]

    def crash(*_args):
        raise OSError("killed between the temporary file and the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        saved_checkpoint(run, 2, "async_ps")
    assert not (run.checkpoint(2) / MARKER).exists()
    assert run.newest() == folder  # the half-finished step 2 is invisible


def test_prune_keeps_the_newest_complete_and_the_current(tmp_path):
    run = RunDir.of(tmp_path / "run")
    folders = [saved_checkpoint(run, step, "sync") for step in (1, 2, 3)]
    half = run.checkpoint(4)
    half.mkdir()  # a save killed half-way: no marker
    run.prune(keep=2, current=folders[-1])
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_00000002", "step_00000003"]


def test_every_run_path_comes_from_the_run_folder(tmp_path):
    run = RunDir.of(tmp_path / "x" / ".." / "run")
    assert run.path == (tmp_path / "run").resolve()
    assert [p.relative_to(run.path).as_posix() for p in (run.config, run.metrics, run.wandb_id, run.preempted,
                                                          run.checkpoint(12))] == [
        "config.yaml", "metrics.jsonl", "wandb_id.txt", "PREEMPTED", "checkpoints/step_00000012"]


def test_a_damaged_newest_checkpoint_is_set_aside_for_the_older_one(tmp_path, caplog):
    run = RunDir.of(tmp_path / "run")
    older, newer = saved_checkpoint(run, 1, "sync"), saved_checkpoint(run, 2, "sync")
    (newer / STATE).write_text("{")  # truncated
    assert run.newest_intact() == older
    assert not newer.exists() and (run.checkpoints / "step_00000002.corrupt" / MARKER).is_file()
    assert "llmtrain_state.json has 1 bytes" in caplog.text
    run.prune(keep=1, current=older)
    assert (run.checkpoints / "step_00000002.corrupt").is_dir()  # pruning never deletes what was set aside
    assert not run.damaged.exists()
    (older / "config.yaml").unlink()
    with pytest.raises(UserError, match=r"every checkpoint in .* is damaged \(step_00000001.corrupt, "
                                        r"step_00000002.corrupt; each kept, recorded in .*DAMAGED.json\); "
                                        "run.resume=restart starts over"):
        run.newest_intact()
    mark = json.loads(run.damaged.read_text())
    assert mark["found"] == {"step_00000001.corrupt": "config.yaml is missing",
                             "step_00000002.corrupt": "set aside by an earlier run"}


def test_flipped_bytes_in_a_tensor_file_fail_their_checksum(tmp_path):
    import torch

    run = RunDir.of(tmp_path / "run")
    folders = []
    for step in (1, 2):
        folder = run.checkpoint(step)
        folder.mkdir(parents=True)
        torch.save({"w": torch.arange(4096, dtype=torch.float32)}, folder / "mp_rank_00_model_states.pt")
        finish_checkpoint(folder, "precision: fp32\n", {"step": step}, {"step": step})
        folders.append(folder)
    shard = folders[1] / "mp_rank_00_model_states.pt"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell, torch.load would return a wrong weight
    shard.write_bytes(bytes(raw))
    assert damage(folders[1], verify_contents=False) is None
    assert "mp_rank_00_model_states.pt fails its checksum (member " in damage(folders[1])
    assert damage(folders[0]) is None
    with pytest.raises(UserError, match=r"step_00000002 is damaged \(mp_rank_00_model_states.pt fails its checksum"):
        load_trained(run.path)  # generate and export refuse it too, naming the older steps
    assert run.newest_intact() == folders[0] and (run.checkpoints / "step_00000002.corrupt").is_dir()


def test_a_save_that_cannot_finish_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from llmtrain.run.checkpoint import saving

    run = RunDir.of(tmp_path / "run")
    older = saved_checkpoint(run, 1, "sync")
    folder = run.checkpoint(2)
    with pytest.raises(UserError, match=r"step_00000002 could not be saved \(I/O error\); the older checkpoints"):
        with saving(folder, need=10):
            folder.mkdir()
            (folder / "part.pt").write_bytes(b"x")
            raise OSError("I/O error")
    assert not folder.exists() and run.newest() == older
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(100 * 2**20, 99 * 2**20, 2**20))
    with pytest.raises(UserError, match=r"no space left on device: .*step_00000002 needs ~8 MB, 1 MB are free"):
        with saving(folder, need=8 * 2**20):  # torch.save's own words for a full disk are a C++ stream error
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
