"""The tuned glibc malloc, in real processes: a command re-executes itself once with GLIBC_TUNABLES, and glibc then
keeps its mmap threshold fixed (freed layers leave the process) instead of raising it after the first large free. This
is also what fails when a glibc upgrade changes the behaviour llmtrain.allocator works around."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmtrain import allocator

pytestmark = pytest.mark.slow
PROBE = """
import ctypes, os
from llmtrain.allocator import use_tuned_malloc
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
use_tuned_malloc(int(os.environ["STAGE"]))  # the ZeRO stage of the run asking
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free(ctypes.c_void_p(libc.malloc(20 << 20)))  # glibc's default: this free raises the threshold to 20 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(6 << 20)
print("mapped", libc.mallinfo2().hblks - before, flush=True)
"""

needs_glibc = pytest.mark.skipif(allocator.glibc_version() is None or allocator.glibc_version() < allocator.MIN_GLIBC,
                                 reason="glibc 2.35 or later only")


def run_probe(stage: int = 3, **env: str) -> list[list[str]]:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")} | {"STAGE": str(stage)}
    if allocator.host_has_gpu(base):  # a GPU host keeps glibc's defaults: probe it as a CPU run
        base["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [line.split() for line in out.splitlines()]


@needs_glibc
def test_a_command_re_executes_once_with_the_tunables_and_large_blocks_stay_mapped():
    lines = run_probe()
    assert [line[0] for line in lines] == ["start", "start", "mapped"]  # the same code ran twice: once re-executed
    assert lines[0][1] == lines[1][1]  # same pid: launchers (torchrun, srun) keep tracking it
    assert lines[0][2] == "None" and lines[1][2] == allocator.TUNABLES
    assert lines[2] == ["mapped", "1"]  # a 6 MiB block has its own mapping even after a 20 MiB free


@needs_glibc
def test_glibc_defaults_at_zero0_or_when_the_user_set_tunables():
    lines = run_probe(GLIBC_TUNABLES="")
    assert [line[0] for line in lines] == ["start", "mapped"]
    assert lines[1] == ["mapped", "0"]  # glibc's dynamic threshold: the 6 MiB block came from the heap
    zero0 = run_probe(stage=0)  # a ZeRO-0 run keeps glibc's defaults too
    assert [line[0] for line in zero0] == ["start", "mapped"] and zero0[1] == ["mapped", "0"]
