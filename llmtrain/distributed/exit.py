"""How a rank's process ends: out of the process group, without interpreter finalization.

``destroy_process_group`` leaves gloo's worker threads running (DeepSpeed keeps references to the groups). A
worker that drops the last reference to a tensor while Python finalizes cannot take the GIL: the thread is
unwound through a ``noexcept`` destructor and the rank aborts (SIGABRT, "terminate called without an active
exception") after all its work is done, which fails the launcher. So a rank leaves the group, runs its
``atexit`` handlers (logging, wandb, the run lock), flushes its output and ends with ``os._exit``. Every file a
run writes is closed (and fsynced) before that, so nothing is lost.

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
