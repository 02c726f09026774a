"""The core both training modes stand on (llmtrain/run/): one checkpoint procedure around a mode's tensor files,
one resume path, and one cadence of logging, evaluation and saving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmtrain.config import Mode, ModelConfig, Resume, TrainLoopConfig
from llmtrain.errors import UserError
from llmtrain.run.cadence import Cadence
from llmtrain.run.checkpoint import Checkpoints, Peers, client_state
from llmtrain.run.rundir import MARKER, STATE, RunDir, read_marker

SHA = "ab" * 32
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300)


class FakeIO:
    """A mode's tensor files: one file of numbers; ``read`` records what it loaded."""

    def __init__(self, mode: Mode = Mode.sync, fail: Exception | None = None) -> None:
        self.mode, self.fail, self.loaded = mode, fail, None

    def num_params(self) -> int:
        return 10

    def marker_fields(self) -> dict[str, Any]:
        return {"world_size": 3, "zero_stage": 1}

    def write(self, folder: Path, state: dict[str, Any], settled: bool = False) -> None:
        (folder / "tensors.bin").write_text(f"weights of step {state['step']}")
        self.settled = settled

    def check(self, folder: Path, marker: dict[str, Any]) -> None:
        pass

    def read(self, folder: Path, marker: dict[str, Any]) -> None:
        if self.fail is not None:
            raise self.fail
        self.loaded = ((folder / "tensors.bin").read_text(), marker["world_size"])


def checkpoints(tmp_path: Path, io: FakeIO, keep: int = 2) -> Checkpoints:
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"tok")
    run = RunDir.of(tmp_path / "run")
    run.path.mkdir(exist_ok=True)  # made by the set-up before any save
    return Checkpoints(run, io, Peers(), keep, {"tokenizer.model": tokenizer})


def state(step: int) -> dict[str, Any]:
    return client_state(step, 100 * step, SHA, MODEL, seed=1, reader={"consumed": step})


def test_a_save_writes_the_mode_files_then_llmtrain_files_then_the_marker_in_one_schema(tmp_path):
    saver = checkpoints(tmp_path, FakeIO())
    folder = saver.save(5, state(5), "precision: fp32\n")
    marker = read_marker(folder)
    assert {k: v for k, v in marker.items() if k != "files"} == {"step": 5, "mode": "sync", "world_size": 3,
                                                                  "zero_stage": 1}
    assert sorted(marker["files"]) == ["config.yaml", STATE, "tensors.bin", "tokenizer.model"]
    assert json.loads((folder / STATE).read_text())["reader"] == {"consumed": 5}
    assert (folder / "tensors.bin").read_text() == "weights of step 5"


def test_old_checkpoints_are_pruned_and_resume_takes_the_newest(tmp_path):
    saver = checkpoints(tmp_path, FakeIO(Mode.async_ps), keep=2)
    for step in (2, 4, 6):
        saver.save(step, state(step), "")
    assert [s for s, _ in saver.run.complete()] == [4, 6]
    io = FakeIO(Mode.async_ps)
    resumed = checkpoints(tmp_path, io).resume(Resume.auto, SHA, MODEL)
    assert resumed["step"] == 6 and resumed["tokens_seen"] == 600
    assert io.loaded == ("weights of step 6", 3)


def test_nothing_to_resume_and_a_rule_broken_before_any_tensor_is_read(tmp_path):
    assert checkpoints(tmp_path, FakeIO()).resume(Resume.auto, SHA, MODEL) is None
    checkpoints(tmp_path, FakeIO()).save(3, state(3), "")
    io = FakeIO(Mode.async_ps)
    with pytest.raises(UserError, match="was saved by mode=sync and this run has mode=async_ps"):
        checkpoints(tmp_path, io).resume(Resume.auto, SHA, MODEL)
    io = FakeIO()
    with pytest.raises(UserError, match="has another tokenizer than data.dir"):
        checkpoints(tmp_path, io).resume(Resume.auto, "cd" * 32, MODEL)
    assert io.loaded is None


@pytest.mark.parametrize("error", [OSError("disk gone"), RuntimeError("bad zip"), KeyError("module")])
def test_a_load_that_fails_is_one_message_whatever_the_mode(tmp_path, error):
    checkpoints(tmp_path, FakeIO()).save(3, state(3), "")
    with pytest.raises(UserError, match=r"checkpoint .*step_00000003 could not be loaded \(.+\); it may be corrupt: "
                                        "remove it to resume from an older one"):
        checkpoints(tmp_path, FakeIO(fail=error)).resume(Resume.auto, SHA, MODEL)


def test_a_refusal_of_the_mode_passes_through_unchanged(tmp_path):
    checkpoints(tmp_path, FakeIO()).save(3, state(3), "")
    with pytest.raises(UserError, match="^saved with another stage$"):
        checkpoints(tmp_path, FakeIO(fail=UserError("saved with another stage"))).resume(Resume.auto, SHA, MODEL)


def test_a_save_without_room_is_refused_by_every_peer_and_keeps_the_older_ones(tmp_path, monkeypatch):
    saver = checkpoints(tmp_path, FakeIO())
    saver.save(1, state(1), "")
    shared = []
    saver.peers = Peers(share=lambda problem: shared.append(problem) or problem)
    monkeypatch.setattr("llmtrain.run.checkpoint.no_room", lambda folder, need: "no space left on device: full")
    with pytest.raises(UserError, match="no space left on device: full; the older checkpoints are kept"):
        saver.save(2, state(2), "")
    assert shared == ["no space left on device: full"]
    assert [s for s, _ in saver.run.complete()] == [1] and not (saver.run.checkpoint(2) / MARKER).exists()


def cadence(**fields) -> Cadence:
    loop = dict(max_steps=20, log_every=5, eval_every=8, checkpoint_every=6, stop_at_step=0)
    loop.update(fields)
    return Cadence.of(TrainLoopConfig(**loop))


def test_the_cadence_of_a_whole_run():
    c = cadence()
    steps = range(1, 21)
    assert [s for s in steps if c.log(s)] == [5, 10, 15, 20]
    assert [s for s in steps if c.evaluate(s)] == [8, 16, 20]  # the last step always evaluates
    assert [s for s in steps if c.save(s)] == [6, 12, 18, 20]  # and always saves
    assert [s for s in steps if c.stops(s)] == [20] and c.is_last(20) and not c.is_last(19)


def test_the_cadence_of_a_run_that_ends_early():
    c = cadence(stop_at_step=12, eval_every=0, checkpoint_every=0)
    assert c.stops(12) and not c.is_last(12) and c.save(12) and not c.evaluate(12)
    assert c.stops(7, signalled=True) and c.save(7, signalled=True) and not c.save(7)
    assert [s for s in range(1, 21) if c.evaluate(s)] == [20]
