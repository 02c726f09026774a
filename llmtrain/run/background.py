"""What lets the loop go on while a checkpoint is written (train.checkpoint_async=true): the state copied to host
memory in the loop (``HostCopies``), and the one save written on a background thread (``InFlight``).

The loop stops only for the copy. The copy goes into buffers kept from one save to the next (what DeepSpeed's
and torch's asynchronous writers call staging buffers): a fresh allocation costs ~1 s per GB in page faults on a
CPU host, a reused one ~0.1 s per GB (docs/benchmarks.md, "Checkpoints without stopping"). They cost one copy of
this process's part of a checkpoint in host memory for the rest of the run (``llmtrain.distributed.memory``).
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
    """Copies of nested states (dicts, lists, tuples of tensors and plain values) in host memory, made so that
    ``torch.save`` writes a copy exactly as it would have written the original: every storage is copied whole and
    once, and the tensors that shared one share its copy (same offsets, sizes, strides, dtype, requires_grad)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._used = 0
        self._storages: dict[int, torch.UntypedStorage] = {}

    def begin(self) -> None:
        """A new save: its copies reuse the previous save's buffers, in the same order."""
        self._used, self._storages = 0, {}

    @property
    def nbytes(self) -> int:
        """Host memory held in buffers."""
        return sum(b.numel() for b in self._buffers)

    def copy(self, state: Any) -> Any:
        """``state`` with every tensor in its containers copied to host memory (everything else deep-copied,
        the Python attributes some tensors carry included: torch.save writes them)."""
        tensors = _tensors(state)
        memo = {id(t): self._tensor(t) for t in tensors}
        for tensor in tensors:
            if tensor.__dict__:
                memo[id(tensor)].__dict__.update(copy.deepcopy(tensor.__dict__, memo))
        return copy.deepcopy(state, memo)

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's identity, as torch.save itself keys storages
        if key not in self._storages:
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            buffer = self._buffer(whole.numel(), tensor.device)
            buffer.copy_(whole)
            self._storages[key] = buffer.untyped_storage()
        copied = torch.empty(0, dtype=tensor.dtype).set_(self._storages[key], tensor.storage_offset(),
                                                         tensor.size(), tensor.stride())
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(copied, requires_grad=tensor.requires_grad)
        return copied.requires_grad_(tensor.requires_grad)

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
    long it waited); its failure is raised by the next ``wait``, on every process alike (the writer agreed on it)."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        """Whether this process logs its waits (the main one)."""
        self._thread: threading.Thread | None = None
        self._error: UserError | None = None

    def start(self, write: Callable[[], None], what: str) -> None:
        self.wait(f"before {what}")
        self._thread = threading.Thread(target=self._run, args=(write,), name="llmtrain-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except UserError as exc:
            self._error = exc

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
