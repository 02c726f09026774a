"""How a rank ends (llmtrain/distributed/exit.py), in real processes over gloo: its exit code, its atexit handlers and
output, no group left; the linger before an unexpected failure beside local peers, also through Hydra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

PROGRAM = """
import atexit, os, sys, time
import torch.distributed as dist
from llmtrain.distributed.exit import ended_process

def handler():
    print("atexit ran; group up:", dist.is_initialized())
    print(f"{time.monotonic() - started:.2f}", file=sys.stderr)  # the last line: seconds from main to the handlers

def main():
    global started
    started = time.monotonic()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    atexit.register(handler)
    sys.stdout.write("unflushed output")  # kept in the buffer, no newline
    {ending}

ended_process(main)()
print("never printed")
"""


def end(ending: str, local_ranks: int = 1) -> subprocess.CompletedProcess:
    from llmtrain.distributed.env import _free_port

    code = textwrap.dedent(PROGRAM).replace("{ending}", ending)
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(local_ranks)}
    return subprocess.run([sys.executable, "-c", code, str(_free_port())], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)


@pytest.mark.parametrize(("ending", "code"), [("return", 0), ("sys.exit(3)", 3), ("sys.exit(None)", 0),
                                              ("raise RuntimeError('boom')", 1), ("sys.exit('bad input')", 1)])
def test_a_rank_ends_with_its_code_after_its_handlers_and_output_out_of_the_group(ending, code):
    proc = end(ending)
    assert proc.returncode == code, proc.stderr[-2000:]
    # the group was left before the handlers ran; buffered output was flushed; nothing after main ran
    assert proc.stdout == "unflushed outputatexit ran; group up: False\n"
    if code == 1:
        assert ("RuntimeError: boom" in proc.stderr and "Traceback" in proc.stderr) or "bad input" in proc.stderr


@pytest.mark.parametrize(("ending", "local_ranks", "lingers"), [("raise RuntimeError('peer gone')", 2, True),
                                                                ("raise RuntimeError('alone')", 1, False),
                                                                ("sys.exit(2)", 2, False), ("return", 2, False)])
def test_only_an_unexpected_failure_beside_local_peers_lingers(ending, local_ranks, lingers):
    """So that a launcher sees a killed peer's exit before this rank's consequent error (and names the peer)."""
    from llmtrain.distributed.exit import LINGER_S

    proc = end(ending, local_ranks)
    seconds = float(proc.stderr.strip().splitlines()[-1])
    assert (seconds >= LINGER_S) is lingers and seconds < LINGER_S + 5, seconds


HYDRA_PROGRAM = """
import atexit, sys, time
from llmtrain.cli._entry import hydra_command
from llmtrain.config import TrainConfig
from llmtrain.distributed.exit import ended_process

started = time.monotonic()
atexit.register(lambda: print(f"{time.monotonic() - started:.2f}", file=sys.stderr))  # the last line

def task(cfg):
    raise RuntimeError("Connection reset by peer")

sys.argv = ["llmtrain-train", "data.dir=d", "run.dir=r"]
ended_process(hydra_command("llmtrain-train", "train", TrainConfig, task))()
"""


@pytest.mark.parametrize(("local_ranks", "full_error", "lingers"), [(2, "", True), (2, "1", True), (1, "", False)])
def test_an_unexpected_failure_reported_by_hydra_lingers_once(tmp_path, local_ranks, full_error, lingers):
    """Hydra catches a task's unexpected error, prints it and exits 1 (a SystemExit, not a failure to
    ended_process): the linger must come before that, and only once where the error also reaches ended_process
    (HYDRA_FULL_ERROR=1). Without it a launcher named this rank instead of the killed peer (in a CI run)."""
    from llmtrain.distributed.exit import LINGER_S

    env = {**os.environ, "LOCAL_WORLD_SIZE": str(local_ranks), "HYDRA_FULL_ERROR": full_error,
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", HYDRA_PROGRAM], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Connection reset by peer" in proc.stderr
    seconds = float(proc.stderr.strip().splitlines()[-1])
    assert (seconds >= LINGER_S) is lingers and seconds < 2 * LINGER_S, seconds
