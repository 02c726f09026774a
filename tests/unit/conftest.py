"""Unit tests run in this process only: starting a process (a console script, torchrun, a multiprocessing worker)
fails the test. Tests that need processes belong in tests/integration (or faults/, cluster/), marked slow."""

from __future__ import annotations

import multiprocessing.process
import subprocess

import pytest


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a unit test started a process; move it to tests/integration and mark it slow")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
