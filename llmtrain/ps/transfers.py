"""A worker's pulls and pushes, to every server of the parameter-server mode."""

from __future__ import annotations

import time

import torch

from llmtrain.ps import rpc as calls


class Transfers:
    """A worker's pulls and pushes, to every server: in the foreground, or (``ps.overlap``) double-buffered in the
    background, at most one pull and one push in flight. Times spent waiting and bytes moved travel with the next
    push's stats (``pull_s``, ``push_s``, ``bytes``)."""

    def __init__(self, trainer, params: dict[str, torch.nn.Parameter]) -> None:
        """``trainer``: the worker's ``AsyncPSTrainer`` (its transport, servers, shards, worker id and dtype)."""
        self.trainer, self.params = trainer, params
        self.servers = range(trainer.num_servers)
        self._pull = None  # futures of the pull in flight
        self._push = None
        self.pull_s = self.push_s = 0.0
        self.pulled_bytes = 0

    @property
    def pushing(self) -> bool:
        return self._push is not None

    def _start_pull(self) -> list:
        t = self.trainer
        return [t.transport.call(i, calls.pull, t.worker) for i in self.servers]

    def _prefetch(self) -> torch.futures.Future:
        """The next pull, started once the push in flight is answered (so its weights lack at most this worker's
        next update: a lone worker's updates are at most one version stale), or now when none is in flight."""
        if self._push is None:
            started: torch.futures.Future = torch.futures.Future()
            started.set_result(self._start_pull())
            return started
        return torch.futures.collect_all(list(self._push.values())).then(lambda _: self._start_pull())

    def fetch(self, prefetch: bool) -> list[int]:
        """Copy fresh weights into the model (the pull in flight, or one made now); with ``prefetch`` start the
        next pull (``_prefetch``). Each server's version of the shard it handed out."""
        start = time.perf_counter()
        if self._pull is None:
            pulled = self._start_pull()
        else:
            pulled = self.trainer._call(0, self._pull)  # the pull futures (a failed push surfaces at its own wait)
        self._pull = None
        versions = []
        with torch.no_grad():
            for i, fut in zip(self.servers, pulled, strict=True):
                version, tensors = self.trainer._call(i, fut)
                versions.append(version)
                for name, tensor in tensors.items():
                    self.params[name].copy_(tensor)
                    self.pulled_bytes += tensor.numel() * tensor.element_size()
        if prefetch:
            self._pull = self._prefetch()
        self.pull_s += time.perf_counter() - start
        return versions  # each server's own: servers apply the same pushes, not at the same moments

    def push(self, grad: dict[str, torch.Tensor], versions: list[int], stats: dict, wanted: int,
             background: bool, dtype: torch.dtype | None = None, server0_last: bool = False) -> list[int]:
        """Push ``grad`` (computed on each server's ``versions``) to every server, in ``dtype`` (the compute dtype by
        default); the units server 0 leases next (none while the push is in flight, then from ``wait_push``).
        ``server0_last``: the other servers have it before server 0 does (DiLoCo's sync rounds: when server 0 closes
        a round, the others hold every pseudo-gradient it applies). A DiLoCo worker's ``stats["inner_state"]`` goes
        to server 0 only, and is not counted in ``bytes`` (the training traffic): it is the worker's part of a
        checkpoint, which a synchronous rank writes to storage instead."""
        t = self.trainer
        granted = self.wait_push() if self._push is not None else []
        start = time.perf_counter()
        wire = {n: g.to("cpu", dtype or t.dtype) for n, g in grad.items()}
        grads = [{n: wire[n] for n in shard} for shard in t.shards]
        inner = stats.pop("inner_state", None)
        pushed_bytes = sum(g.numel() * g.element_size() for shard in grads for g in shard.values())
        stats = {**stats, "pull_s": self.pull_s, "push_s": self.push_s, "bytes": self.pulled_bytes + pushed_bytes}
        self.pull_s = self.pulled_bytes = 0  # reported once, with this push (push_s: the last push's)
        order = [*self.servers[1:], 0] if server0_last else list(self.servers)
        self._push = {}
        for i in order:
            sent = {**stats, "inner_state": inner} if i == 0 and inner is not None else stats
            self._push[i] = t.transport.call(i, calls.push, t.worker, grads[i], versions[i], sent,
                                             wanted if i == 0 else 0)
            if server0_last and i:
                t._call(i, self._push[i])
        self.push_s = time.perf_counter() - start
        return granted if background else granted + self.wait_push()

    def wait_push(self) -> list[int]:
        """Wait for the push in flight; the units server 0 leased with it."""
        start = time.perf_counter()
        answers = {i: self.trainer._call(i, fut) for i, fut in self._push.items()}
        self._push = None
        self.push_s += time.perf_counter() - start
        return list(answers[0])

    def close(self) -> None:
        """Wait for what is still in flight (a prefetched pull is not used)."""
        if self._push is not None:
            self.wait_push()
        if self._pull is not None:
            for i, fut in zip(self.servers, self.trainer._call(0, self._pull), strict=True):
                self.trainer._call(i, fut)
            self._pull = None
