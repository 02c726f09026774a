"""The run lock (run/lock.py) against a real process: a holder whose process has ended is taken over."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from llmtrain.run import lock

pytestmark = pytest.mark.slow


def test_a_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "LOCK"
    path.write_text(json.dumps({**lock.this_process(), "pid": int(dead.stdout), "job_id": None}))
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        lock.acquire(path)
    assert f"no process {int(dead.stdout)} on this host" in caplog.text
    mine = json.loads(path.read_text())
    assert mine["pid"] == os.getpid()
    lock.release(path, mine)
    assert not path.exists()
