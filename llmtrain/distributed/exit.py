"""How a rank's process ends: out of the process group, without interpreter finalization.

``destroy_process_group`` leaves gloo's threads running (DeepSpeed keeps references to the groups: a rank still
has its 2 ``gloo_tcp_loop`` and 4 ``pt_gloo_runloop`` threads at exit). Now and then (a few times in CI, never in
100+ runs in a row on demand) a rank then aborted *after* all its work was done -- SIGABRT, "terminate called
without an active exception", what a native thread unwound by Python's finalization through a ``noexcept`` frame
prints -- and failed the launcher. Which thread it was stays unproven; but a process that never finalizes cannot
abort there. So a rank leaves the group, runs its ``atexit`` handlers (logging, wandb, the run lock), flushes its
output and ends with ``os._exit``. Every file a run writes is closed (checkpoints fsynced) before that.

Imports no torch: ``--help`` stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def ended_process(main: Callable[[], None]) -> Callable[[], NoReturn]:
    """``main`` of a command that may join a process group, ending as described above with its exit code; a crash
    on the way prints the Python stack of every thread (``faulthandler``)."""

    @functools.wraps(main)
    def ended() -> NoReturn:
        faulthandler.enable(all_threads=True)  # a crash (SIGSEGV, SIGABRT, ...) prints every thread's Python stack
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # what the interpreter would print, and exit 1 with
            traceback.print_exc()
            code = 1
        exit_now(code)

    return ended


def _exit_code(code: object) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # sys.exit("message") prints the message and exits 1
    return 1


def exit_now(code: int) -> NoReturn:
    """Leave the process group, run the ``atexit`` handlers, flush, and exit without finalization."""
    try:
        if "torch.distributed" in sys.modules:
            from llmtrain.distributed.env import shutdown

            shutdown()
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
