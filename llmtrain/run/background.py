"""What lets the loop go on while a checkpoint is written (train.checkpoint_async): the state snapshotted in the
loop (``HostCopies``), and the one save written on a background thread (``InFlight``).

A snapshot is taken in the loop, which stops for it. Its tensors are either copied into host buffers kept from one
save to the next (what DeepSpeed's and torch's asynchronous writers call staging buffers: a fresh allocation costs ~1 s
per GB in page faults on a CPU host, a reused one ~0.1 s per GB, docs/benchmarks.md, "Checkpoints without stopping"),
or *live*: the tensors themselves, which the writer reads while the loop computes its next step's forward and
backward, and which the loop does not change before its next update -- it waits there until the writer has read them
(``InFlight.wait_released``). train.checkpoint_buffer_gb bounds the copies; what does not fit stays live.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmtrain.errors import AgreedError, UserError

log = logging.getLogger("llmtrain")


class HostCopies:
    """Snapshots of nested states (dicts, lists, tuples of tensors and plain values) that ``torch.save`` writes exactly
    as it would have written the original: every tensor is a new one over its storage's copy in host memory (each
    storage copied whole and once; the tensors that shared one share its copy: same offsets, sizes, strides, dtype,
    requires_grad) or, for a live snapshot, over the original storage itself; everything else is deep-copied as of
    now (the Python attributes some tensors carry included: torch.save writes them)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._used = 0
        self._storages: dict[int, torch.UntypedStorage] = {}

    def begin(self) -> None:
        """A new save: its copies reuse the previous save's buffers, in the same order."""
        self._used, self._storages = 0, {}

    def clear(self) -> None:
        """Hand the buffers back (a save written directly needs none)."""
        self._buffers, self._used, self._storages = [], 0, {}

    @property
    def nbytes(self) -> int:
        """Host memory held in buffers."""
        return sum(b.numel() for b in self._buffers)

    def copy(self, state: Any) -> Any:
        """``state`` with every tensor copied to host memory."""
        return self._snapshot(state, self._copied_storage)

    def live(self, state: Any) -> Any:
        """``state`` with every tensor a new one over the same storage: no tensor data copied, so the original
        tensors must not change until the snapshot is written."""
        return self._snapshot(state, lambda tensor: tensor.untyped_storage())

    def _snapshot(self, state: Any, storage_of: Callable[[torch.Tensor], torch.UntypedStorage]) -> Any:
        tensors = _tensors(state)
        memo = {id(t): _over(storage_of(t), t) for t in tensors}
        for tensor in tensors:
            if tensor.__dict__:
                memo[id(tensor)].__dict__.update(copy.deepcopy(tensor.__dict__, memo))
        return copy.deepcopy(state, memo)

    def _copied_storage(self, tensor: torch.Tensor) -> torch.UntypedStorage:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's identity, as torch.save itself keys storages
        if key not in self._storages:
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            buffer = self._buffer(whole.numel(), tensor.device)
            buffer.copy_(whole)
            self._storages[key] = buffer.untyped_storage()
        return self._storages[key]

    def _buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """The next buffer of this save, reused when the previous save's had the same size. From a GPU the copy
        goes to pinned memory (the fast path of a device-to-host copy)."""
        index, self._used = self._used, self._used + 1
        if index < len(self._buffers) and self._buffers[index].numel() == nbytes:
            return self._buffers[index]
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer


def _over(storage: torch.UntypedStorage, tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor over ``storage`` with ``tensor``'s view of its own storage (a Parameter stays one)."""
    made = torch.empty(0, dtype=tensor.dtype, device=storage.device).set_(storage, tensor.storage_offset(),
                                                                          tensor.size(), tensor.stride())
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(made, requires_grad=tensor.requires_grad)
    return made.requires_grad_(tensor.requires_grad)


def storage_bytes(state: Any) -> int:
    """Bytes of the distinct storages of ``state``'s tensors: what a copy of it takes."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in _tensors(state)}.values())


def _tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor in ``state``'s dicts, lists and tuples."""
    found, stack = [], [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


class InFlight:
    """At most one save written on a background thread. ``start`` waits for the previous one first (and says how
    long it waited); its failure is raised by the next ``wait``, on every process alike (the writer agreed on it).
    The writer is handed a ``release`` to call once it no longer reads live tensors; until then the loop may not
    change them (``wait_released``)."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        """Whether this process logs its waits (the main one)."""
        self._thread: threading.Thread | None = None
        self._error: UserError | None = None
        self._released = threading.Event()
        self._released.set()

    def start(self, write: Callable[[Callable[[], None]], None], what: str) -> None:
        self.wait(f"before {what}")
        self._released.clear()
        self._thread = threading.Thread(target=self._run, args=(write,), name="llmtrain-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[Callable[[], None]], None]) -> None:
        try:
            write(self._released.set)
        except UserError as exc:
            self._error = exc
        finally:
            self._released.set()

    def wait_released(self, why: str) -> None:
        """Until the save in flight (if any) no longer reads live tensors (logged with ``why`` when the loop had to
        wait); before an update changes them."""
        if self._released.is_set():
            return
        started = time.perf_counter()
        self._released.wait()
        waited = time.perf_counter() - started
        if self.report and waited >= 0.01:
            log.info("waited %.2f s for the checkpoint being written %s", waited, why)

    def wait(self, why: str = "", raise_error: bool = True) -> None:
        """Until the save in flight (if any) is written and marked complete; ``why`` (when set) is logged with
        the wait when the loop had to wait for it."""
        if self._thread is not None:
            started = time.perf_counter()
            self._thread.join()
            self._thread = None
            waited = time.perf_counter() - started
            if why and self.report and waited >= 0.01:
                log.info("waited %.2f s for the checkpoint being written %s", waited, why)
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise AgreedError(str(error))

    def __enter__(self) -> InFlight:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        """A loop that ends finishes its save in flight first; a loop that fails does too (the processes stand
        together), without hiding its own error behind the save's."""
        self.wait("at the end", raise_error=exc is None)
