"""Server 0's ledger of the data order in async mode: which local steps of data each worker holds.

The order is the reader's keyed, world-size-free order of sample positions (``TokenWindowReader.windows_at``, or a
mix's schedule). Unit ``u`` is one local step of data: positions ``[u * S, (u + 1) * S)`` with
``S = global_batch_size / W`` sequences. A worker is leased units when it asks (with each push); a push settles
the units it was computed on; a worker lost before its push has its units returned, and they are leased again,
lowest first, before any new one. So every unit below ``next_unit`` is applied exactly once, held by a live worker,
or returned: at the end of a budget of N units, units 0..N-1 were each applied once.

The state is O(workers): a counter, the returned units and each worker's held ones (at most two grants each). It
goes into server 0's checkpoint; a resumed run re-leases what was held or returned at the save, first.
"""

from __future__ import annotations

import heapq
import json
from collections import defaultdict, deque
from pathlib import Path


class Leases:
    def __init__(self, num_workers: int) -> None:
        self.next_unit = 0
        """The first unit never leased."""
        self.returned: list[int] = []
        """A heap of units to lease again (their worker was lost, or the run resumed before their push)."""
        self.held: dict[int, deque[int]] = defaultdict(deque, {w: deque() for w in range(num_workers)})
        """Each worker's leased units, in the order it computes them (a worker that joined later is added when it
        is first leased some)."""

    def outstanding(self, workers) -> int:
        """Units held by ``workers``: leased and not settled."""
        return sum(len(self.held[w]) for w in workers)

    def lease(self, worker: int, count: int) -> list[int]:
        """``count`` more units for ``worker``: returned ones first, lowest first, then new ones."""
        units = [heapq.heappop(self.returned) for _ in range(min(count, len(self.returned)))]
        fresh = count - len(units)
        units += range(self.next_unit, self.next_unit + fresh)
        self.next_unit += fresh
        self.held[worker].extend(units)
        return units

    def settle(self, worker: int, units: list[int]) -> bool:
        """``worker`` pushed the gradient of ``units``: True (and they are settled) if it holds them, in order;
        False if it does not (they were returned when it was lost, and may be leased to another)."""
        held = self.held[worker]
        if list(held)[:len(units)] != list(units):
            return False
        for _ in units:
            held.popleft()
        return True

    def give_back(self, worker: int) -> list[int]:
        """Return everything ``worker`` holds (it was lost, or will not push it): leased again, lowest first."""
        units = list(self.held[worker])
        self.held[worker].clear()
        for unit in units:
            heapq.heappush(self.returned, unit)
        return units

    def state_dict(self) -> dict:
        """What is left to lease: the units held now are not applied in this state, so they are returned too."""
        pending = sorted([*self.returned, *(u for held in self.held.values() for u in held)])
        return {"next_unit": self.next_unit, "returned": pending}

    def load_state_dict(self, state: dict) -> None:
        self.next_unit = int(state["next_unit"])
        self.returned = sorted(int(u) for u in state["returned"])
        heapq.heapify(self.returned)
        for held in self.held.values():
            held.clear()


class UpdateLog:
    """``updates.jsonl``: server 0's line per applied update, with the units of data it was computed on, so the
    data a run trained on can be checked: every unit of the budget once. A resumed run first drops the lines past
    the version it resumes from (their updates are not in the checkpoint), and a torn last line."""

    def __init__(self, path: Path, resumed_version: int) -> None:
        keep = 0
        if path.exists():
            with open(path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n") or json.loads(line)["version"] > resumed_version:
                        break
                    keep += len(line)
        self.file = open(path, "ab")
        self.file.truncate(keep)

    def write(self, record: dict) -> None:
        row = {"version": record["version"], "worker": record["worker"], "staleness": record["staleness"],
               "units": record["leases"]}
        self.file.write(json.dumps(row).encode() + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
