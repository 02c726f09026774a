"""A run folder's histories (run/rundir.py, run/checkpoint.py): a folder whose checkpoints are all damaged is marked
and refused until run.resume=restart, which moves the earlier history aside (nothing deleted); the main process's
verdict reaches every peer; non-finite steps in a row end a run with one truthful line (both modes)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtrain.config import Mode, ModelConfig, OptimConfig, Resume
from llmtrain.errors import RunDiverged, UserError
from llmtrain.ps.server import ParameterServer
from llmtrain.run.cadence import NonfiniteStreak
from llmtrain.run.checkpoint import Checkpoints, Peers, client_state, diverged
from llmtrain.run.metrics import last_scores
from llmtrain.run.rundir import RunDir

SHA = "ab" * 32
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300)


class FakeIO:
    mode = Mode.sync

    def num_params(self) -> int:
        return 10

    def marker_fields(self) -> dict[str, Any]:
        return {"world_size": 2, "zero_stage": 0}

    def write(self, folder: Path, state: dict[str, Any], settled: bool = False) -> None:
        (folder / "tensors.bin").write_text(f"weights of step {state['step']}")

    def check(self, folder: Path, marker: dict[str, Any]) -> None:
        pass

    def read(self, folder: Path, marker: dict[str, Any]) -> None:
        pass


def saver(tmp_path: Path, peers: Peers | None = None) -> Checkpoints:
    run = RunDir.of(tmp_path / "run")
    run.path.mkdir(exist_ok=True)
    return Checkpoints(run, FakeIO(), peers or Peers(), keep=5)


def save(checkpoints: Checkpoints, *steps: int) -> None:
    for step in steps:
        checkpoints.save(step, client_state(step, 0, SHA, MODEL, seed=1), "precision: fp32\n")


def damage_all(run: RunDir) -> None:
    for _, folder in run.complete():
        (folder / "tensors.bin").write_text("")  # a lost write: not the size the marker recorded


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_whose_checkpoints_are_all_damaged_is_refused_until_restart(tmp_path):
    checkpoints = saver(tmp_path)
    run = checkpoints.run
    save(checkpoints, 2, 4)
    damage_all(run)
    with pytest.raises(UserError, match=r"^every checkpoint in .*checkpoints is damaged \(step_00000002.corrupt, "
                                        r"step_00000004.corrupt; each kept, recorded in .*DAMAGED.json\); "
                                        r"run.resume=restart starts over"):
        checkpoints.resume(Resume.auto, SHA, MODEL)
    mark = json.loads(run.damaged.read_text())
    assert mark["found"]["step_00000004.corrupt"] == "tensors.bin has 0 bytes, 17 were written" and mark["time"]
    for _ in range(2):  # the same command again: refused again, never a silent start at step 0
        with pytest.raises(UserError, match=r"^every checkpoint in .*checkpoints was found damaged "
                                            r"\(step_00000002.corrupt, step_00000004.corrupt; .*DAMAGED.json written "):
            checkpoints.resume(Resume.auto, SHA, MODEL)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_00000002.corrupt", "step_00000004.corrupt"]


def test_checkpoints_set_aside_earlier_and_none_left_are_refused_too(tmp_path):
    checkpoints = saver(tmp_path)
    save(checkpoints, 3)
    folder = checkpoints.run.checkpoint(3)
    folder.rename(folder.with_name(folder.name + ".corrupt"))  # by a run before the mark existed
    with pytest.raises(UserError, match=r"is damaged \(step_00000003.corrupt;"):
        checkpoints.resume(Resume.auto, SHA, MODEL)
    assert json.loads(checkpoints.run.damaged.read_text())["found"] == {
        "step_00000003.corrupt": "set aside by an earlier run"}


def test_restart_moves_every_history_aside_whole_and_deletes_nothing(tmp_path, caplog):
    caplog.set_level("INFO", logger="llmtrain")
    checkpoints = saver(tmp_path)
    run = checkpoints.run
    save(checkpoints, 2, 4)
    damage_all(run)
    with pytest.raises(UserError):
        checkpoints.resume(Resume.auto, SHA, MODEL)
    for path, text in ((run.metrics, '{"step": 1, "loss": 6.0}\n'), (run.config, "precision: fp32\n"),
                       (run.wandb_id, "abc"), (run.preempted, "{}"), (run.lock, "held")):
        path.write_text(text)
    before = files(run.path)
    assert checkpoints.resume(Resume.restart, SHA, MODEL) is None
    aside = run.path / "previous" / "1"
    assert sorted(p.name for p in run.path.iterdir()) == ["LOCK", "previous"]  # the lock stays with the folder
    assert {f"previous/1/{k}" if k != "LOCK" else k: v for k, v in before.items()} == files(run.path)
    assert f"the earlier history (DAMAGED.json, PREEMPTED, checkpoints, config.yaml, metrics.jsonl, wandb_id.txt) " \
           f"was moved to {aside}" in caplog.text
    # the new history: auto-resume sees only its own checkpoints; a second restart takes the next number
    save(checkpoints, 1)
    assert checkpoints.resume(Resume.auto, SHA, MODEL)["step"] == 1
    checkpoints.resume(Resume.restart, SHA, MODEL)
    assert sorted(p.name for p in run.previous.iterdir()) == ["1", "2"]
    assert [p.name for p in (run.previous / "2" / "checkpoints").iterdir()] == ["step_00000001"]
    assert checkpoints.resume(Resume.restart, SHA, MODEL) is None  # nothing left to move: nothing moved
    assert "held no earlier history" in caplog.text and sorted(p.name for p in run.previous.iterdir()) == ["1", "2"]


def test_only_the_main_process_decides_and_every_peer_takes_its_verdict(tmp_path):
    channel: list[str] = []
    main = saver(tmp_path, Peers(is_main=True, share=lambda value: channel.append(value) or value))
    peer = saver(tmp_path, Peers(is_main=False, share=lambda value: channel[-1]))
    save(main, 2)
    assert main.verdict(Resume.auto, SHA, MODEL) == peer.verdict(Resume.auto, SHA, MODEL) == main.run.checkpoint(2)
    damage_all(main.run)
    with pytest.raises(UserError) as on_main:
        main.verdict(Resume.auto, SHA, MODEL)
    with pytest.raises(UserError) as on_peer:
        peer.verdict(Resume.auto, SHA, MODEL)
    assert str(on_main.value) == str(on_peer.value) and "is damaged" in str(on_peer.value)
    assert main.verdict(Resume.restart, SHA, MODEL) is None and peer.verdict(Resume.restart, SHA, MODEL) is None
    save(main, 1)
    for process in (main, peer):  # the resume rule too: checked once, refused everywhere
        with pytest.raises(UserError, match="has another tokenizer than data.dir"):
            process.verdict(Resume.auto, "cd" * 32, MODEL)


def test_non_finite_steps_in_a_row_are_counted_and_any_finite_one_resets_the_count():
    streak = NonfiniteStreak(3)
    losses = {1: 5.0, 2: math.nan, 3: math.inf, 4: 4.0, 5: math.nan, 6: math.nan}
    assert [streak.add(step, math.isfinite(loss)) for step, loss in losses.items()] == [False] * 6
    assert streak.add(7, False) and (streak.first, streak.count) == (5, 3)


def test_the_line_of_a_diverged_run_names_the_checkpoint_or_says_there_is_none(tmp_path):
    checkpoints = saver(tmp_path)
    run = checkpoints.run
    error = diverged(run, 1, 5, 5)
    assert isinstance(error, RunDiverged) and error.exit_code == 3
    assert str(error) == ("steps 1-5 had a non-finite loss or gradient and were skipped (train.max_nonfinite_steps=5 "
                          f"in a row): stopping; no checkpoint was saved in {run.checkpoints}: lower optim.lr or check "
                          "the data, then re-run (it starts at step 0)")
    save(checkpoints, 2)
    assert str(diverged(run, 3, 7, 5)).endswith(
        f"stopping; the newest checkpoint is {run.checkpoint(2)} (step 2, saved before these steps): lower optim.lr "
        "or check the data, then re-run to continue from it")
    save(checkpoints, 4)
    assert "(step 4, saved during these steps, whose updates were skipped)" in str(diverged(run, 3, 7, 5))


def test_a_parameter_server_skips_non_finite_updates_and_stops_after_enough_skipped_steps():
    w = torch.ones(2, 2)
    ps = ParameterServer({"w": w}, OptimConfig(name="sgd", lr=0.1, warmup_steps=0, weight_decay=0.0), max_steps=100,
                         num_workers=2, staleness_lr=False, max_nonfinite_steps=2)

    def push(worker: int, loss: float, finite_grads: bool = True) -> bool:
        stats = {"loss": loss, "finite_grads": finite_grads, "pull_s": 0.0, "push_s": 0.0, "bytes": 0,
                 "leases": list(ps.leases.held[worker])[:1] or ps.grant(worker, 1)}  # as a worker holds them
        return ps.push(worker, {"w": torch.full((2, 2), math.nan if not finite_grads else 1.0)}, ps.version, stats)

    assert push(0, 1.0) and push(1, 1.0)  # step 1: applied
    applied = ps.master_weights()["w"].clone()
    assert push(0, math.nan) and push(1, 1.0, finite_grads=False)  # step 2: both skipped, counted
    assert torch.equal(ps.master_weights()["w"], applied) and ps.skipped_steps == 1
    assert push(0, 1.0) and push(1, 1.0)  # step 3: applied, the count starts again
    assert push(0, 1.0) and push(1, math.nan)  # step 4: one skipped update makes a skipped step
    assert push(0, math.inf) and ps.diverged is None
    assert not push(1, 1.0)  # step 5 ends the second skipped step in a row: the budget ends at once
    assert ps.diverged == (4, 5) and ps.skipped_steps == 3 and not push(0, 1.0)
    assert [r["skipped"] for r in ps.records] == [False, False, True, True, False, False, False, True, True, False]


def test_a_finished_run_reports_the_last_evaluation_its_metrics_hold(tmp_path):
    run = RunDir.of(tmp_path)
    assert last_scores(run, 10) == {}
    rows = [{"step": 5, "val_loss": 6.5, "val_ppl": 665.1}, {"step": 10, "loss": 6.0},
            {"step": 10, "val_loss": 6.1, "val_ppl": 445.9, "val_loss/a": 6.2}, {"step": 12, "val_loss": 5.0}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "val')  # a torn last line
    assert last_scores(run, 10) == {"val_loss": 6.1, "val_ppl": 445.9, "val_loss/a": 6.2}
