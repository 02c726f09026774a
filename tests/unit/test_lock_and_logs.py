"""One run per run.dir (train/lock.py) and progress that a log file can hold (train/metrics.py)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from llmtrain.config import WandbConfig
from llmtrain.errors import UserError
from llmtrain.run import lock, metrics
from llmtrain.run.rundir import RunDir


def test_a_live_holder_is_named_and_the_lock_left_alone(tmp_path):
    path = tmp_path / "LOCK"
    holder = {**lock.this_process(), "pid": os.getppid(), "job_id": "4242"}  # a live process on this host
    path.write_text(json.dumps(holder))
    with pytest.raises(UserError, match=rf"is in use by another run \(host .*, pid {os.getppid()}, Slurm job 4242"):
        lock.acquire(path)
    assert json.loads(path.read_text()) == holder


def test_the_same_slurm_job_takes_its_own_lock_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    path = tmp_path / "LOCK"
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "job_id": "77", "since": "earlier"}))
    lock.acquire(path)  # a requeued job starting on another node
    assert json.loads(path.read_text())["job_id"] == "77"


def test_another_hosts_lock_without_proof_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / "LOCK"
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "job_id": None, "since": "earlier"}))
    with pytest.raises(UserError, match="host another-node, pid 1, since earlier.*delete"):
        lock.acquire(path)


def test_progress_in_a_log_file_is_one_plain_line_per_log_step(tmp_path, caplog, capsys):
    logger = metrics.MetricsLogger(RunDir.of(tmp_path), True, WandbConfig(), {}, total_steps=200, start_step=0)
    assert logger.bar is None  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="llmtrain"):
        logger.advance()
        logger.log(10, {"loss": 5.06812, "tokens_per_s": 1716.4})
    logger.close()
    assert "step 10/200: loss 5.0681, 1,716 tokens/s" in caplog.text
    err = capsys.readouterr().err
    assert "\r" not in err and err.isascii()


def test_a_terminal_gets_the_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "stderr_is_terminal", lambda: True)
    logger = metrics.MetricsLogger(RunDir.of(tmp_path), True, WandbConfig(), {}, total_steps=5, start_step=0)
    assert logger.bar is not None
    logger.close()


def test_a_torn_last_metrics_row_is_cut_off_on_resume(tmp_path):
    run = RunDir.of(tmp_path)
    run.metrics.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')  # killed mid-write
    logger = metrics.MetricsLogger(run, True, WandbConfig(), {}, total_steps=5, start_step=1)
    logger.log(2, {"loss": 4.5})
    logger.close()
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [1, 2]
    # read from the end a block at a time: a torn row longer than a block, a file of one torn row, a whole file
    row = '{"step": 1, "loss": 5.0}\n'
    for text, kept in [(row * 3 + '{"x": "' + "y" * 200_000, row * 3), ('{"step": 1', ""), (row, row)]:
        run.metrics.write_text(text)
        metrics.drop_torn_last_line(run.metrics)
        assert run.metrics.read_text() == kept
