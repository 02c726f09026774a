"""How a rank's process ends: out of the process group; over gloo, without interpreter finalization.

``destroy_process_group`` leaves gloo's threads running (DeepSpeed keeps references to the groups: a rank still
has its 2 ``gloo_tcp_loop`` and 4 ``pt_gloo_runloop`` threads at exit). Now and then (a few times in CI, never in
100+ runs in a row on demand) a rank then aborted *after* all its work was done -- SIGABRT, "terminate called
without an active exception", what a native thread unwound by Python's finalization through a ``noexcept`` frame
prints -- and failed the launcher. Which thread it was stays unproven; but a process that never finalizes cannot
abort there. So a rank leaves the group, runs its ``atexit`` handlers (logging, wandb, the run lock), flushes its
output and ends with ``os._exit`` (:data:`NO_FINALIZATION`). Every file a run writes is closed (checkpoints fsynced)
before that. All of this was seen over gloo only: a rank whose group is NCCL, or one on a CUDA host that holds no
gloo group, ends normally through ``sys.exit`` (:func:`ends_without_finalization`).

A rank whose collective broke because a peer's connection closed says so in one line naming the peer's node
(:func:`lost_peer`) instead of a traceback: the peer's own node, not this rank, is where to look.

A rank that fails unexpectedly beside local peers first lingers (``linger_for_local_peers``, :data:`LINGER`), so
that its launcher names the rank that failed first. That is about the launcher, not the backend: it runs everywhere.

Imports no torch: ``--help`` stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import functools
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import NoReturn

from llmtrain.distributed.slurm import node_at
from llmtrain.workarounds import Upstream, Workaround, usable

NO_FINALIZATION = Workaround(
    name="ending a rank without interpreter finalization",
    works_around="gloo's native threads (2 gloo_tcp_loop, 4 pt_gloo_runloop) outlive destroy_process_group; now and "
                 "then a rank aborted in Python's finalization after all its work was done (SIGABRT, 'terminate "
                 "called without an active exception') and failed the launcher; no upstream issue found",
    checked_with="torch 2.13.0 (gloo), deepspeed 0.19.8, CPython 3.11",
    runs_where="a rank whose process group is gloo, or a torch process on a host without CUDA; NCCL ranks and CUDA "
               "hosts without a gloo group end through sys.exit",
    upstream=(Upstream("atexit:_run_exitfuncs"),))  # CPython's private "run the handlers now" (a builtin: no signature)
LINGER = Workaround(
    name="a failed rank lingers before it ends",
    works_around="torchrun names as root cause the failure with the smallest timestamp, in whole seconds, then the "
                 "first rank (ChildFailedError.get_first_failure): a rank whose collective a killed peer cut off fails "
                 "within milliseconds and was named instead of that peer",
    checked_with="torch 2.13.0 (torchrun)",
    runs_where="any launcher and backend, when a rank fails unexpectedly beside local peers (LOCAL_WORLD_SIZE or "
               "LOCAL_SIZE > 1); it patches and calls nothing, so only the tests check its upstream",
    upstream=(Upstream("torch.distributed.elastic.multiprocessing.errors:ChildFailedError.get_first_failure",
                       ("self",), source=("min(self.failures.keys(), key=lambda r: self.failures[r].timestamp)",)),
              Upstream("torch.distributed.elastic.multiprocessing.errors:ProcessFailure._set_no_reply_file",
                       source=("self.timestamp = int(time.time())",))))


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
            linger_for_local_peers()
        exit_now(code)

    return ended


LINGER_S = 2.0


def linger_for_local_peers() -> None:
    """A rank that fails unexpectedly while other ranks share its launcher waits ``LINGER_S`` before it ends.

    When a peer is killed, this rank's own error (a collective cut off: "Connection reset by peer") follows within
    milliseconds; a launcher that then sees both exits in one poll names the wrong rank as the root cause (torchrun
    keeps the earliest by whole-second timestamps, then by rank). Lingering, the first failure is seen first and this
    rank is stopped by the launcher. A rank alone on its node (one per namespace-node, say) leaves at once.
    LOCAL_WORLD_SIZE is torchrun's, LOCAL_SIZE the deepspeed launcher's.
    """
    global _lingered
    if not _lingered and int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))) > 1:
        _lingered = True  # once per process: the Hydra wrapper and ended_process may both see the failure
        time.sleep(LINGER_S)


_lingered = False


# gloo's TCP transport names the peer whose connection it lost (gloo/transport/tcp/pair.cc): "Connection closed by
# peer [10.0.0.2]:41234" when the peer's process is gone, "Read error [10.0.0.2]:41234: Connection reset by peer".
_LOST_PEER = re.compile(r"(Connection closed by peer|Read error|Write error) \[([^\]]+)\]:\d+(?:: ([^.\n]+))?")


def lost_peer(exc: BaseException, environ: Mapping[str, str] = os.environ) -> str | None:
    """One line naming the node (or address) whose ranks this rank lost in a collective, when ``exc`` or an error it
    was raised from is the backend's report of a closed connection; None for any other error. A Slurm job's node is
    named as in its node list."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = _LOST_PEER.search(str(exc))
        if found:
            what, address, reason = found.groups()
            node = node_at(address, environ)
            peer = f"node {node} ({address})" if node else address
            return (f"lost {peer}: {(reason or what).lower()}; a rank there died or its node failed; a run with the "
                    "same run.dir resumes from its last complete checkpoint")
        exc = exc.__cause__ or exc.__context__
    return None


def _exit_code(code: object) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # sys.exit("message") prints the message and exits 1
    return 1


def ends_without_finalization(modules: Mapping[str, ModuleType] = sys.modules) -> bool:
    """Whether this process may hold gloo's threads (``modules``: those imported): its process group is gloo, or (no
    group up) torch runs on a host without CUDA, where any group it had was gloo. One that never imported torch has
    none of them."""
    dist = modules.get("torch.distributed")
    if dist is None:
        return False
    if dist.is_available() and dist.is_initialized():
        abrupt = "gloo" in str(dist.get_backend())
    else:
        abrupt = not modules["torch"].cuda.is_available()
    return abrupt and usable(NO_FINALIZATION)


def exit_now(code: int) -> NoReturn:
    """Leave the process group and end with ``code``: where :func:`ends_without_finalization`, run the ``atexit``
    handlers, flush and exit without finalization; elsewhere through ``sys.exit``."""
    abrupt = ends_without_finalization()  # before the group is left: its backend decides
    try:
        if "torch.distributed" in sys.modules:  # only then: this module imports no torch, so --help stays fast
            from llmtrain.distributed.env import shutdown

            shutdown()
    finally:
        if not abrupt:
            sys.exit(code)
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
