"""Shared fixtures: a small prepared dataset made from the embedded default corpus (the stdlib's .py files)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmtrain.config import DataConfig, Source

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def small_data_config(folder: Path, **overrides) -> DataConfig:
    """150 stdlib documents, a 1024-token vocabulary and 50k-token shards (so windows span several shards)."""
    fields = dict(source=Source.stdlib, dir=str(folder), max_documents=150, vocab_size=1024,
                  tokenizer_sample_documents=100, shard_tokens=50_000, num_proc=1, val_fraction=0.05)
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory) -> Path:
    from llmtrain.data.prepare import prepare

    folder = tmp_path_factory.mktemp("prepared") / "small"
    prepare(small_data_config(folder))
    return folder


@pytest.fixture(scope="session")
def prepared_second(prepared_small, tmp_path_factory) -> Path:
    """Another corpus (other stdlib documents, another split seed) prepared with ``prepared_small``'s tokenizer:
    the second source of a mix."""
    from llmtrain.data.prepare import prepare
    from llmtrain.data.reader import PreparedData

    folder = tmp_path_factory.mktemp("prepared") / "second"
    prepare(small_data_config(folder, max_documents=60, seed=99,
                              tokenizer_path=str(PreparedData(prepared_small).tokenizer_file)))
    return folder


def run_cli(*args: str, timeout: float = 600, **kwargs):
    """Run a console script of this venv; returns the CompletedProcess (text mode)."""
    import subprocess

    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          cwd=kwargs.pop("cwd", REPO), **kwargs)


try:  # the scheduling of pytest-xdist's workers (pyproject's addopts: -n 2 --dist loadfile)
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # installed without the dev extra: pytest runs in one process
    LoadFileScheduling = None

if LoadFileScheduling is not None:
    class _FileOrCluster(LoadFileScheduling):
        """A worker takes a whole test file, so the runs a file caches train once and its tests keep their order;
        every file of tests/cluster/ goes to one worker together: they share the Slurm clusters and their nodes (one
        test kills a node that the others need)."""

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "tests/cluster/" if path.startswith("tests/cluster/") else path

    def pytest_xdist_make_scheduler(config, log):
        return _FileOrCluster(config, log)


# LLMTRAIN_TEST_TIMES=<file.jsonl>: one line per test -- its xdist worker, start time, setup + call + teardown seconds,
# the processes it started (program and ranks) and the seconds it slept in time.sleep -- for scripts/test_times.py's
# tables (docs/testing.md).
if os.environ.get("LLMTRAIN_TEST_TIMES"):
    import json
    import subprocess
    import threading
    import time

    _current: dict = {}

    def _ranks(argv: list[str]) -> int:
        for i, arg in enumerate(argv):
            if arg.startswith("--nproc_per_node") or arg.startswith("--nproc-per-node"):
                return int(arg.partition("=")[2] or argv[i + 1])
        return 1

    _popen_init, _sleep = subprocess.Popen.__init__, time.sleep

    def _recording_popen(self, args, *a, **kw):
        argv = [str(x) for x in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
        if _current and argv:
            _current["launches"].append([Path(argv[0]).name, _ranks(argv)])
        _popen_init(self, args, *a, **kw)

    def _recording_sleep(seconds):
        if _current and threading.current_thread() is threading.main_thread():  # the test's own waits
            _current["sleep_s"] += seconds
        _sleep(seconds)

    subprocess.Popen.__init__ = _recording_popen
    time.sleep = _recording_sleep

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _current.update(nodeid=item.nodeid, worker=os.environ.get("PYTEST_XDIST_WORKER", ""), at=round(time.time(), 3),
                        launches=[], sleep_s=0.0, start=time.perf_counter())
        yield
        record = dict(_current, seconds=round(time.perf_counter() - _current.pop("start"), 3))
        _current.clear()
        with open(os.environ["LLMTRAIN_TEST_TIMES"], "a") as f:
            f.write(json.dumps(record) + "\n")
