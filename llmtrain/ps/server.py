"""A parameter server: the fp32 master copy of its shard of the model and the optimizer state for it.

Every pushed gradient is applied as it arrives (no waiting for other workers). The version counts local steps
applied: a push of ``units`` local steps (``ps.push_every``) is one optimizer step on their summed gradient and
moves the version by ``units``. Each update records its staleness: the server's version when it is applied minus
the version the worker computed it on. Calls arrive on TensorPipe's RPC threads, so one lock orders them.

The budget (max_steps x workers local steps) is spent exactly, on data applied exactly once: server 0 owns the
data order and grants a worker local steps as leases of units of data (``leases.py``): at most what the budget
holds beyond what is applied and leased to the other live workers, asked for with each push. A lost worker's
leases return to the others; a worker out of leases waits for more until the budget is applied (``wait_grant``).
A push of units the worker no longer holds is refused, by server 0 (its ledger) and by the others (told of every
returned lease before it is leased again).

A push whose loss or gradient was non-finite is skipped (it counts towards the budget, as a skipped synchronous
step does, and changes no weight); a step (W updates) with a skipped one is a skipped step, and
``train.max_nonfinite_steps`` of them in a row stop the run (``diverged``).

Mixed precision: pulls hand out the weights in the workers' compute dtype (``wire_dtype``: bf16 halves the bytes
of every pull and push), pushed gradients of any dtype are applied to the fp32 masters in fp32 -- as DeepSpeed's
bf16 optimizer keeps fp32 masters behind bf16 module weights.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from llmtrain.config import OptimConfig, PSConfig
from llmtrain.optim import build_optimizer, build_outer_optimizer, lr_at, set_lr
from llmtrain.ps.leases import Leases
from llmtrain.run.background import HostCopies
from llmtrain.run.cadence import NonfiniteStreak

log = logging.getLogger(__name__)


def shard_names(named_sizes: Sequence[tuple[str, int]], num_servers: int) -> list[list[str]]:
    """Split parameter names among servers, balanced by size: largest first, each to the least loaded server.
    Deterministic, so every process computes the same split."""
    if num_servers > len(named_sizes):
        raise ValueError(f"{num_servers} servers for {len(named_sizes)} tensors: some would hold nothing")
    loads, shards = [0] * num_servers, [[] for _ in range(num_servers)]
    for name, size in sorted(named_sizes, key=lambda item: (-item[1], item[0])):
        target = min(range(num_servers), key=lambda i: (loads[i], i))
        shards[target].append(name)
        loads[target] += size
    return [sorted(shard) for shard in shards]


class ParameterServer:
    def __init__(self, params: dict[str, torch.Tensor], optim: OptimConfig, max_steps: int, num_workers: int,
                 staleness_lr: bool, max_staleness: int = 0, timeout_s: float = 60.0, stop_at_step: int = 0,
                 wire_dtype: torch.dtype = torch.float32, max_nonfinite_steps: int = 5,
                 owns_data_order: bool = True) -> None:
        self.params = {n: nn.Parameter(t.detach().clone().float()) for n, t in params.items()}
        self.wire_dtype = wire_dtype
        """The dtype pulls hand out: the workers' compute precision."""
        self.optim_cfg, self.max_steps, self.num_workers = optim, max_steps, num_workers
        self.optimizer = self._build_optimizer()
        self.budget = min(stop_at_step or max_steps, max_steps) * num_workers
        """Updates to apply in this run: num_workers pushes carry as many tokens as one synchronous step."""
        self.stop_granule = num_workers
        """A stop request ends the run at a multiple of this many local steps (whole steps)."""
        self.staleness_lr = staleness_lr
        self.max_staleness, self.timeout_s = max_staleness, timeout_s
        self.version = 0
        self.lock = threading.Condition()
        self.records: list[dict] = []
        """One per applied update: worker, staleness, loss, timings (read by the metrics of server 0)."""
        self.clock = {w: 0 for w in range(num_workers)}
        """Local steps applied per worker."""
        self.owns_data_order = owns_data_order
        """Server 0: it leases the data (``leases``); the others refuse pushes of units it returned (``revoked``)."""
        self.leases = Leases(num_workers)
        self.revoked: set[tuple[int, int]] = set()
        """(worker, unit) pairs server 0 took back from a lost worker (servers other than 0)."""
        self.on_give_back: Callable[[int, list[int]], None] | None = None
        """Server 0: tells the other servers of leases it takes back, before it leases them again."""
        self.last_seen = {w: time.monotonic() for w in range(num_workers)}
        self.idle: set[int] = set()
        """Workers waiting for a lease (``wait_grant``): nothing to compute, so no bound on staleness waits for them."""
        self.finished: set[int] = set()
        self.frozen_at: float | None = None
        """When the run was ended at the version applied then (``freeze``), by ``time.monotonic``."""
        self.released = threading.Event()
        """Set by server 0 when the run is over: the other servers may then leave."""
        self.ready = threading.Event()
        """Set once the shard is what the run starts from (resumed, where it resumes): pulls wait for it."""
        self.copies = HostCopies()
        self.staged: dict | None = None
        """This shard's state copied by ``stage`` for a checkpoint, until it is written."""
        self.nonfinite = NonfiniteStreak(max_nonfinite_steps)
        self.skipped_steps = 0
        self._step_skipped = False
        self.diverged: tuple[int, int] | None = None
        """The first and last step of ``max_nonfinite_steps`` skipped steps in a row, once there were (the budget
        then ends at once)."""

    def _count_steps(self, before: int, skipped: bool) -> None:
        """After each update (lock held; the version moved from ``before``): at the end of each step it completes,
        count it skipped or not; stop the run at once when that makes ``max_nonfinite_steps`` in a row."""
        self._step_skipped |= skipped
        ends = self.version // self.num_workers
        for step in range(before // self.num_workers + 1, ends + 1):
            step_skipped = self._step_skipped  # this update's flag carries into a step it began and did not end
            self._step_skipped = skipped and bool(step < ends or self.version % self.num_workers)
            self.skipped_steps += step_skipped
            if self.nonfinite.add(step, not step_skipped) and self.diverged is None:
                self.diverged = (self.nonfinite.first, step)
                self.budget = self.version

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """What applies the pushed updates to this shard: the run's optimizer (``optim.*``)."""
        return build_optimizer(self.optim_cfg, self.params.values(), offload=False, device=torch.device("cpu"))

    def _lr(self) -> float:
        """The learning rate of the next update: the schedule's, at the step the version is in."""
        return lr_at(self.version // self.num_workers, self.optim_cfg, self.max_steps)

    def start(self) -> None:
        """The shard is what the run starts from: answer pulls (and grants)."""
        self.ready.set()

    def proceed(self, step: int) -> None:
        """Server 0's reporting thread has logged, evaluated and saved ``step`` (a hook of ``RoundServer``)."""

    def state_dict(self) -> dict:
        """Everything to continue exactly: weights, optimizer state, version and per-worker update counts (the
        live tensors: ``stage`` copies them)."""
        return {"params": {n: p.detach() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "version": self.version, "clock": dict(self.clock),
                "leases": self.leases.state_dict()}

    def stage(self) -> None:
        """Copy ``state_dict`` for a checkpoint, into host buffers kept for the next one, in one piece (updates wait
        meanwhile): the weights and the optimizer state of one version, however late the copy is written."""
        with self.lock:
            self.copies.begin()
            self.staged = self.copies.copy(self.state_dict())

    def write(self, path: str) -> None:
        """Write ``state_dict`` to ``path`` as it is (updates wait meanwhile), with no copy: the buffers of earlier
        background saves are handed back first."""
        with self.lock:
            self.copies.clear()
            self.staged = None
            torch.save(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        with self.lock, torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state["params"][name])
            self.optimizer.load_state_dict(state["optimizer"])
            # the launched workers' counts (a worker that had joined the saved run is gone with it)
            saved = {int(w): int(c) for w, c in state["clock"].items()}
            self.version, self.clock = int(state["version"]), {w: saved.get(w, 0) for w in range(self.num_workers)}
            # a checkpoint from before leases: the data continues after the units its version counts
            self.leases.load_state_dict(state.get("leases", {"next_unit": self.version, "returned": []}))

    def stop_at(self, updates: int) -> int:
        """Spend no more than ``updates`` local steps in this run (a stop request): never below what is applied and
        granted already, rounded up to a whole step. The budget now."""
        with self.lock:
            promised = self.version + self.leases.outstanding(self.live_workers())
            whole = -(-max(updates, promised) // self.stop_granule) * self.stop_granule
            self.budget = min(self.budget, whole)
            self.lock.notify_all()
            return self.budget

    def freeze(self) -> int:
        """End the run at the version applied now: a stop that cannot wait for the units lost workers hold (they
        return only after ps.timeout_s). No push is applied after it (each is refused and its units go back to the
        ledger); the units leased and not applied are returned in the checkpoint's state (``Leases.state_dict``), so
        a resumed run leases them again first. The version, which need not end a step."""
        with self.lock:
            self.budget = self.version
            self.frozen_at = time.monotonic()
            self.lock.notify_all()
            return self.version

    def _seen(self, worker: int) -> None:
        """``worker`` called now (lock held); one that joined later is known from its first call on."""
        if worker not in self.clock:
            self.clock[worker] = 0
        self.last_seen[worker] = time.monotonic()

    def join(self) -> int:
        """Server 0: the id of a worker that joins the running job (after every id given so far)."""
        with self.lock:
            worker = max(self.clock) + 1
            self._seen(worker)
            log.info("worker %d joined the job", worker)
            return worker

    def leave(self, worker: int) -> None:
        """Server 0: ``worker`` stops (a stop signal): its leases go to the others now, not after ps.timeout_s."""
        with self.lock:
            units = self.leases.give_back(worker)
            if units and self.on_give_back is not None:
                self.on_give_back(worker, units)
            log.info("worker %d left the job; its %d local step(s) of data go to the others", worker, len(units))
            self.finished.add(worker)
            self.lock.notify_all()

    def live_workers(self) -> list[int]:
        """Workers neither finished nor silent for longer than the timeout (killed, or their host lost)."""
        now = time.monotonic()
        return [w for w in self.clock if w not in self.finished and now - self.last_seen[w] < self.timeout_s]

    def pull(self, worker: int) -> tuple[int, dict[str, torch.Tensor]]:
        """The shard and its version; with max_staleness, first wait while this worker is too far ahead."""
        with self.lock:
            self._seen(worker)
            while self.max_staleness and self.version < self.budget:
                live = [w for w in self.live_workers() if w not in self.idle] or [worker]
                if self.clock[worker] - min(self.clock[w] for w in live) <= self.max_staleness:
                    break
                self.lock.wait(timeout=0.1)
                self.last_seen[worker] = time.monotonic()
            return self.version, {n: p.detach().to(self.wire_dtype, copy=True) for n, p in self.params.items()}

    def master_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the fp32 master weights of this shard."""
        with self.lock:
            return {n: p.detach().clone() for n, p in self.params.items()}

    def finish(self, worker: int) -> None:
        with self.lock:
            self.finished.add(worker)
            self.lock.notify_all()

    def wait_until_done(self, linger_s: float = 2.0) -> bool:
        """Block until the budget is spent and every live worker has finished; True if none was lost. Once the run
        is frozen, the workers still alive are waited for ``linger_s`` at most (each hears at its next call that the
        run is over): a lost one is not waited for."""
        with self.lock:
            while True:
                if len(self.finished) == len(self.clock):
                    return True
                if not self.live_workers():  # the rest were lost (silent for longer than the timeout)
                    return False
                if self.frozen_at is not None and time.monotonic() - self.frozen_at > linger_s:
                    return False
                self.lock.wait(timeout=0.2)

    def grant(self, worker: int, wanted: int) -> list[int]:
        """The units (local steps of data) ``worker`` may compute next, beyond those it holds: at most ``wanted``,
        and no more than the budget holds beyond what is applied and leased to every live worker (a lost worker's
        leases are taken back first). Empty: the budget is spent or promised."""
        with self.lock:
            self._seen(worker)
            live = set(self.live_workers()) | {worker}
            for lost in sorted(w for w in self.clock if w not in live and self.leases.held[w]):
                units = self.leases.give_back(lost)
                log.warning("worker %d was lost (silent for more than ps.timeout_s=%g s): its %d local step(s) of "
                            "data go to the others", lost, self.timeout_s, len(units))
                if self.on_give_back is not None:
                    self.on_give_back(lost, units)
            promised = self.version + self.leases.outstanding(live)
            return self.leases.lease(worker, max(0, min(wanted, self.budget - promised)))

    def revoke(self, worker: int, units: list[int]) -> None:
        """Server 0 took ``units`` back from ``worker``: refuse its push of them (servers other than 0)."""
        with self.lock:
            self.revoked.update((worker, u) for u in units)

    def _take(self, worker: int, units: list[int]) -> bool:
        """Whether ``worker`` may apply its push of ``units`` here (settling them on server 0)."""
        if self.owns_data_order:
            return self.leases.settle(worker, units)
        if any((worker, u) in self.revoked for u in units):
            self.revoked.difference_update((worker, u) for u in units)
            return False
        return True

    def wait_grant(self, worker: int, wanted: int, seconds: float) -> list[int] | None:
        """A worker holding no lease asks again (``grant``) until it is leased units, or the budget is applied
        (empty: it stops). Meanwhile the rest of the budget is leased to other live workers: they push it, or one is
        lost and its leases return. None after ``seconds`` (shorter than the RPC timeout): ask again."""
        deadline = time.monotonic() + seconds
        with self.lock:
            self.idle.add(worker)
            try:
                while True:
                    given = self.grant(worker, wanted)
                    if given or self.version >= self.budget:
                        return given
                    if time.monotonic() >= deadline:
                        return None
                    self.lock.notify_all()  # a worker waiting at its pull for this one waits no longer
                    self.lock.wait(timeout=0.1)
            finally:
                self.idle.discard(worker)

    def push(self, worker: int, grads: dict[str, torch.Tensor], computed_on: int, stats: dict,
             wanted: int = 1) -> list[int]:
        """Apply one worker's gradient (the mean over the local steps of the units ``stats["leases"]``) now; then
        lease it up to ``wanted`` more units (none once the budget is spent or promised). A push of units the
        worker no longer holds (taken back when it was lost) is refused, as is one past a lowered budget."""
        leased = [int(u) for u in stats["leases"]]
        units = len(leased)
        with self.lock:
            self._seen(worker)
            if self.version + units > self.budget:  # a stop request lowered the budget below what was leased
                if self.owns_data_order:
                    self.leases.give_back(worker)
                return []
            if not self._take(worker, leased):
                log.warning("worker %d pushed %d local step(s) of data it no longer held (taken back when it was "
                            "lost): not applied", worker, units)
                return []
            start = time.perf_counter()
            staleness = self.version - computed_on
            lr = self._lr()
            if self.staleness_lr and staleness > 1:
                lr /= staleness
            skipped = not (math.isfinite(stats["loss"]) and stats.get("finite_grads", True))
            if not skipped:
                set_lr(self.optimizer, lr)
                for name, param in self.params.items():
                    param.grad = grads[name].float()  # applied in fp32, whatever the worker computed in
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            before, self.version = self.version, self.version + units
            self.clock[worker] += units
            self.records.append({"worker": worker, "version": self.version, "staleness": staleness, "lr": lr, **stats,
                                 "units": units, "skipped": skipped, "apply_s": time.perf_counter() - start,
                                 "time": time.time()})
            self._count_steps(before, skipped)
            self.lock.notify_all()
        return self.grant(worker, wanted) if wanted else []


class OuterServer(ParameterServer):
    """DiLoCo (ps.algorithm=diloco) with asynchronous rounds: each pushed pseudo-gradient, a worker's round of
    ``ps.inner_steps`` local steps, is applied as it arrives, by the Delayed Nesterov outer optimizer at the constant
    ``ps.outer_lr`` (divided by its staleness with ``ps.staleness_lr``). Server 0 also keeps the inner optimizer state
    each worker sent last (with the push of a round that ends at a checkpoint, and when it finishes): it goes into
    the checkpoints, and a resumed worker continues from it."""

    def __init__(self, params: dict[str, torch.Tensor], *args, outer: PSConfig, **kwargs) -> None:
        self.outer = outer  # before the base builds the optimizer (``_build_optimizer``)
        super().__init__(params, *args, **kwargs)
        self.stop_granule = self.num_workers * outer.inner_steps  # whole rounds
        self.inner: dict[int, dict] = {}
        """Server 0: each worker's inner optimizer state, as it sent it last."""

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return build_outer_optimizer(self.outer, self.params.values(), self.num_workers)

    def _lr(self) -> float:
        return self.outer.outer_lr

    def take_inner(self, worker: int, state: dict | None) -> None:
        """Keep ``worker``'s inner optimizer state (a copy: the message's tensors are views of its bytes)."""
        if state is not None:
            with self.lock:
                self.inner[worker] = tree_map_only(torch.Tensor, torch.clone, state)

    def inner_state(self, worker: int) -> dict | None:
        with self.lock:
            return self.inner.get(worker)

    def push(self, worker: int, grads: dict[str, torch.Tensor], computed_on: int, stats: dict,
             wanted: int = 1) -> list[int]:
        self.take_inner(worker, stats.pop("inner_state", None))
        return super().push(worker, grads, computed_on, stats, wanted)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "inner": dict(self.inner)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with self.lock:
            self.inner = {int(w): s for w, s in state.get("inner", {}).items()}


class RoundServer(OuterServer):
    """DiLoCo as published (ps.sync_rounds=true): the servers average the pseudo-gradients of a round, then take one
    outer step (Nesterov SGD).

    Server 0 runs the rounds. It opens a round by leasing each participant, in worker order, up to
    ``ps.inner_steps`` units (returned units first, lowest first: without losses worker w computes slot w of
    the round, units [r W H + w H, r W H + (w + 1) H)). A push only delivers the pseudo-gradient; the worker then
    waits for its next lease (``wait_grant``). The round closes once every participant pushed or was lost (silent for
    longer than ps.timeout_s: its units return and are leased again in the next round, and the round applies the mean
    of the pseudo-gradients that arrived). Server 0 then has the other servers apply the same workers' (``on_close``:
    a worker pushes to them before it pushes to server 0, so theirs have arrived) and opens the next round among the
    workers waiting for work. Where the step a round ends at is evaluated or saved (``holds``), the next round's
    leases wait until the reporting thread has done so (``proceed``): the weights it reads are the round's."""

    def __init__(self, params: dict[str, torch.Tensor], *args, holds: Callable[[int], bool] = lambda step: False,
                 **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        self.holds = holds
        self.open: dict[int, list[int]] = {}
        """Server 0: the participants of the open round and the units each was leased."""
        self.arrived: dict[int, tuple[dict[str, torch.Tensor], int, dict]] = {}
        """The pseudo-gradients of the open round that arrived: worker -> (tensors, version computed on, stats)."""
        self.grants: dict[int, list[int]] = {}
        """Server 0: leases of the open round not yet handed to their worker."""
        self.waiting: set[int] = set()
        """Server 0: workers with no lease, to join the next round."""
        self.held_at: int | None = None
        """Server 0: the step whose evaluation or save the next round's leases wait for."""
        self.on_close: Callable[[list[int]], None] | None = None

    def start(self) -> None:
        with self.lock:
            if self.owns_data_order:
                self._open_round(range(self.num_workers))
        super().start()

    def _open_round(self, candidates) -> None:
        """Lease the next round, in worker order, to the live ``candidates`` (lock held)."""
        live = set(self.live_workers())
        for worker in sorted(w for w in candidates if w in live):
            promised = self.version + self.leases.outstanding(self.open)
            units = self.leases.lease(worker, max(0, min(self.outer.inner_steps, self.budget - promised)))
            if units:
                self.open[worker] = self.grants[worker] = units
            else:
                self.waiting.add(worker)

    def grant(self, worker: int, wanted: int) -> list[int]:
        """This worker's lease of the open round, once (it joins the next round if it has none). A round also closes
        here: workers waiting for their next lease (``wait_grant``) are how a lost participant is noticed."""
        with self.lock:
            self._seen(worker)
            self._close_if_complete()
            if self.held_at is not None:
                return []
            if worker not in self.grants and worker not in self.open:
                self.waiting.add(worker)
            return self.grants.pop(worker, [])

    def push(self, worker: int, grads: dict[str, torch.Tensor], computed_on: int, stats: dict,
             wanted: int = 1) -> list[int]:
        """Deliver ``worker``'s pseudo-gradient of the open round (its next lease comes from ``wait_grant``)."""
        self.take_inner(worker, stats.pop("inner_state", None))
        leased = [int(u) for u in stats["leases"]]
        with self.lock:
            self._seen(worker)
            if self.owns_data_order and self.open.get(worker) != leased:
                log.warning("worker %d pushed %d local step(s) of data it no longer held (taken back when it was "
                            "lost): not applied", worker, len(leased))
                return []
            self.arrived[worker] = ({n: g.float() for n, g in grads.items()}, computed_on, stats)
            if self.owns_data_order:
                self._close_if_complete()
            self.lock.notify_all()
        return []

    def _close_if_complete(self) -> None:
        """Server 0 (lock held): close the open round once each participant pushed or was lost."""
        if not self.owns_data_order or not self.open:
            return
        live = set(self.live_workers())
        for lost in [w for w in self.open if w not in self.arrived and w not in live]:
            units = self.leases.give_back(lost)
            del self.open[lost]
            self.grants.pop(lost, None)
            log.warning("worker %d was lost mid-round (silent for more than ps.timeout_s=%g s): its %d local step(s) "
                        "of data go to the next round", lost, self.timeout_s, len(units))
        if any(w not in self.arrived for w in self.open):
            return
        workers = sorted(self.open)
        if self.on_close is not None:
            self.on_close(workers)
        self.apply_round(workers)
        self.open.clear()
        if self.holds(self.version // self.num_workers) and self.version < self.budget:
            self.held_at = self.version // self.num_workers
        candidates = set(workers) | self.waiting
        self.waiting.clear()
        self._open_round(candidates - self.finished)

    def apply_round(self, workers: list[int]) -> None:
        """One outer step on the mean of ``workers``' pseudo-gradients of the open round (those that are finite); the
        version moves by their units (lock held, or called by server 0 on the other servers)."""
        with self.lock:
            missing = [w for w in workers if w not in self.arrived]
            if missing:
                raise RuntimeError(f"the pseudo-gradients of worker(s) {missing} did not arrive before the round "
                                   "closed")
            start = time.perf_counter()
            entries = [(w, *self.arrived[w]) for w in workers]
            finite = [grads for _, grads, _, stats in entries
                      if math.isfinite(stats["loss"]) and stats.get("finite_grads", True)]
            if finite:
                set_lr(self.optimizer, self.outer.outer_lr)
                for name, param in self.params.items():
                    param.grad = torch.stack([grads[name] for grads in finite]).mean(0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            before, now = self.version, time.time()  # the round's updates are applied at one moment
            apply_s = time.perf_counter() - start
            for worker, _, computed_on, stats in entries:
                units = [int(u) for u in stats["leases"]]
                if self.owns_data_order:
                    self.leases.settle(worker, units)
                self.version += len(units)
                self.clock[worker] = self.clock.get(worker, 0) + len(units)
                self.records.append({"worker": worker, "version": self.version, "staleness": before - computed_on,
                                     "lr": self.outer.outer_lr, **stats, "units": len(units),
                                     "skipped": len(finite) < len(entries), "apply_s": apply_s, "time": now})
            self._count_steps(before, len(finite) < len(entries))
            self.arrived.clear()
            self.lock.notify_all()

    def freeze(self) -> int:
        """As ``ParameterServer.freeze``, at the last closed round: the open round's pseudo-gradients are dropped
        (its units are leased again after a resume)."""
        with self.lock:
            self.arrived.clear()
            self.open.clear()
            self.grants.clear()
            return super().freeze()

    def proceed(self, step: int) -> None:
        with self.lock:
            if self.held_at is not None and step >= self.held_at:
                self.held_at = None
                self.lock.notify_all()

