"""llmtrain-prepare as a plan, K tokenize tasks and a merge: the one-process result, byte for byte, and phases that
are complete or not complete, never half."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmtrain.config import DataConfig
from llmtrain.data import tasks
from llmtrain.data.prepare import prepare
from llmtrain.data.reader import PreparedData
from llmtrain.errors import UserError
from tests.conftest import small_data_config


def run_phases(folder: Path, num_tasks: int, order: list[str] | None = None, **overrides):
    """Every phase of preparing ``folder`` in ``num_tasks`` tasks, in this process; the merge's report."""
    report = None
    for task in ["plan", *(order or map(str, range(num_tasks))), "merge"]:
        report = prepare(small_data_config(folder, num_tasks=num_tasks, task=task, **overrides))
    return report


def split_tokens(folder: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in PreparedData(folder).split(split).shards])


@pytest.mark.parametrize(("num_tasks", "order"), [(2, None), (3, ["2", "0", "1"])])
def test_tasks_then_merge_equal_one_process(prepared_small, tmp_path, num_tasks, order):
    report = run_phases(tmp_path / "d", num_tasks, order)
    one = json.loads((prepared_small / "meta.json").read_text())
    merged = report.meta
    assert merged["tokenizer"] == one["tokenizer"]
    assert merged["config_fingerprint"] == one["config_fingerprint"]
    assert merged["source"] == one["source"]
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(tmp_path / "d", split), split_tokens(prepared_small, split))
        assert merged["splits"][split]["documents"] == one["splits"][split]["documents"]
        # the merge re-packs through the same ShardWriter: even the shard files are the one-process ones
        assert merged["splits"][split] == one["splits"][split]
    for shard in (tmp_path / "d").glob("*.bin"):
        assert shard.read_bytes() == (prepared_small / shard.name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the work folder is gone
    # a plain prepare of the same config counts the merged folder as its own
    assert prepare(small_data_config(tmp_path / "d")).skipped


def test_task_slices_are_contiguous_and_cover_every_document():
    for docs, k in ((150, 2), (150, 7), (10, 10)):
        slices = [tasks.task_documents(docs, k, i) for i in range(k)]
        assert [d for s in slices for d in s] == list(range(docs)) and all(len(s) for s in slices)


def test_merge_with_a_missing_task_is_refused_and_writes_nothing(tmp_path):
    cfg = small_data_config(tmp_path / "d", num_tasks=3, task="plan")
    prepare(cfg)
    prepare(small_data_config(tmp_path / "d", num_tasks=3, task="1"))
    with pytest.raises(UserError, match=r"data.task=merge: task\(s\) 0, 2 of 3 are not complete in .*\.d\.tasks-") \
            as err:
        prepare(small_data_config(tmp_path / "d", num_tasks=3, task="merge"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.iterdir()] == [tasks.work_folder(tmp_path / "d", cfg).name]


def test_a_task_needs_the_plan_and_the_same_num_tasks(tmp_path):
    with pytest.raises(UserError, match="no complete plan in .*; run data.task=plan first"):
        prepare(small_data_config(tmp_path / "d", num_tasks=2, task="0"))
    prepare(small_data_config(tmp_path / "d", num_tasks=2, task="plan"))
    with pytest.raises(UserError, match="was planned for data.num_tasks=2, not 3"):
        prepare(small_data_config(tmp_path / "d", num_tasks=3, task="0"))


def test_a_failed_task_leaves_nothing_complete_and_a_rerun_redoes_only_it(prepared_small, tmp_path, monkeypatch):
    folder = tmp_path / "d"
    prepare(small_data_config(folder, num_tasks=2, task="plan"))
    prepare(small_data_config(folder, num_tasks=2, task="0"))
    work = tasks.work_folder(folder, small_data_config(folder))
    first_done = (work / "task_0" / "task.json").stat().st_mtime_ns
    real_pack = tasks.pack

    def pack_then_fail(*args, **kwargs):
        real_pack(*args, **kwargs)  # the shards are written, then the task dies before its task.json
        raise RuntimeError("simulated failure inside task 1")

    monkeypatch.setattr(tasks, "pack", pack_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare(small_data_config(folder, num_tasks=2, task="1"))
    assert sorted(p.name for p in work.iterdir()) == ["plan", "task_0"]  # no task_1, no staging left
    monkeypatch.setattr(tasks, "pack", real_pack)
    # a re-submission runs every phase again: the complete ones are skipped, task 1 is redone
    reports = [prepare(small_data_config(folder, num_tasks=2, task=t)) for t in ("plan", "0", "1")]
    assert [r.skipped for r in reports] == [True, True, False]
    assert (work / "task_0" / "task.json").stat().st_mtime_ns == first_done
    prepare(small_data_config(folder, num_tasks=2, task="merge"))
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(folder, split), split_tokens(prepared_small, split))


def test_phases_of_a_prepared_folder_do_nothing(prepared_small):
    for task in ("plan", "0", "merge"):
        assert prepare(small_data_config(prepared_small, num_tasks=2, task=task)).skipped


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_tasks": 2}, "data.num_tasks=2 needs data.task=plan, then 0..1, then merge"),
        ({"num_tasks": 2, "task": "2"}, "data.task=2 must be all, plan, merge or a task number in [0, 2)"),
        ({"task": "first"}, "data.task=first must be all, plan, merge"),
        ({"num_tasks": 0}, "data.num_tasks=0 must be >= 1"),
        ({"num_tasks": 2, "task": "plan", "streaming": True}, "data.streaming=true runs in one process"),
    ],
)
def test_task_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        DataConfig(dir="d", **fields)


def test_task_fields_do_not_change_the_fingerprint_but_streaming_does():
    base = DataConfig(dir="d").fingerprint()
    assert DataConfig(dir="d", num_tasks=4, task="3").fingerprint() == base
    assert DataConfig(dir="d", streaming=True).fingerprint() != base
    # the fingerprint of a folder prepared before these fields existed (data/stdlib's meta.json) is unchanged
    assert DataConfig(dir="data/stdlib", num_proc=2).fingerprint() == (
        "bf70360e4a9a1c1b9b7f6e9ffde87ed015a42d65b8e2790c3761e65439087f00")
