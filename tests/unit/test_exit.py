"""How a rank ends (llmtrain/distributed/exit.py): its exit code, its atexit handlers and output, no group left."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

PROGRAM = """
import atexit, os, sys
import torch.distributed as dist
from llmtrain.distributed.exit import ended_process

def handler():
    print("atexit ran; group up:", dist.is_initialized())

def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    atexit.register(handler)
    sys.stdout.write("unflushed output")  # kept in the buffer, no newline
    {ending}

ended_process(main)()
print("never printed")
"""


def end(ending: str) -> subprocess.CompletedProcess:
    from llmtrain.distributed.env import _free_port

    code = textwrap.dedent(PROGRAM).replace("{ending}", ending)
    return subprocess.run([sys.executable, "-c", code, str(_free_port())], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.mark.parametrize(("ending", "code"), [("return", 0), ("sys.exit(3)", 3), ("sys.exit(None)", 0),
                                              ("raise RuntimeError('boom')", 1), ("sys.exit('bad input')", 1)])
def test_a_rank_ends_with_its_code_after_its_handlers_and_output_out_of_the_group(ending, code):
    proc = end(ending)
    assert proc.returncode == code, proc.stderr[-2000:]
    # the group was left before the handlers ran; buffered output was flushed; nothing after main ran
    assert proc.stdout == "unflushed outputatexit ran; group up: False\n"
    if code == 1:
        assert ("RuntimeError: boom" in proc.stderr and "Traceback" in proc.stderr) or "bad input" in proc.stderr
