"""A DiLoCo worker (ps.algorithm=diloco; Douillard et al. 2023, arXiv 2311.08105): rounds of local training between
a pull and a push.

A round: pull the weights θ, take one inner step of the optimizer (``optim.*``, AdamW by default) per unit of data
leased (up to ``ps.inner_steps`` = H; a unit is one local step of global_batch_size / W sequences, as in
Downpour), then push the pseudo-gradient Δ = θ_pulled − θ_local in ``ps.push_dtype``. The servers apply it with
the outer optimizer (``llmtrain.ps.server.OuterServer`` / ``RoundServer``).

- The inner optimizer and its state stay on the worker from round to round. Its learning rate follows the run's
  schedule, indexed by the global step of the unit it computes (unit u is in step u // W), and it clips at every
  inner step, as a synchronous step does.
- In bf16 the model computes in bf16 and the inner optimizer steps fp32 masters (copied back after each step), as
  DeepSpeed's bf16 optimizer keeps them; the round's θ_pulled and Δ are fp32 until Δ is cast for the push.
- An inner step whose loss or gradient is non-finite is skipped (no inner update); a round whose every step was
  skipped, or whose Δ is non-finite, is pushed marked so, and the servers skip it.
- The inner state goes into the checkpoints through server 0: with the push of a round that ends at a checkpoint's
  step, and when the worker finishes. A resumed worker continues from the state saved for it; a worker that joins a
  running job starts with a fresh one.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.utils._pytree import tree_map_only

from llmtrain.dtypes import torch_dtype
from llmtrain.optim import build_optimizer, lr_at, set_lr
from llmtrain.ps import rpc as calls
from llmtrain.ps.grads import clip_, unit_gradient
from llmtrain.run.cadence import Cadence


class InnerRounds:
    """One worker's rounds, driven by the asynchronous trainer's loop (``AsyncPSTrainer._work``)."""

    def __init__(self, trainer, model: torch.nn.Module, transfers) -> None:
        self.t, self.model, self.transfers = trainer, model, transfers
        cfg = trainer.cfg
        self.cfg, self.cadence = cfg, Cadence.of(cfg.train)
        self.params = dict(model.named_parameters())
        if trainer.dtype == torch.float32:
            self.masters = self.params
        else:  # fp32 masters behind the compute-dtype module
            self.masters = {n: torch.nn.Parameter(p.detach().float()) for n, p in self.params.items()}
        self.optimizer = build_optimizer(cfg.optim, self.masters.values(), offload=False, device=trainer.env.device)
        self.push_dtype = torch_dtype(cfg.ps.push_dtype.value) if cfg.ps.push_dtype else trainer.dtype
        self._beat = time.monotonic()

    def resume(self) -> None:
        """Continue from the inner state server 0 holds for this worker (a resumed run's); a joiner starts fresh."""
        if self.t.joined:
            return
        state = self.t._call(0, self.t.transport.call(0, calls.inner_state, self.t.worker))
        if state is not None:
            self.optimizer.load_state_dict(state)

    def state(self) -> dict:
        """The inner optimizer state, on the CPU (what travels to server 0)."""
        return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu"), self.optimizer.state_dict())

    def _heartbeat(self) -> None:
        """Tell server 0 this worker is alive while a round computes (a round may outlast ps.timeout_s)."""
        if time.monotonic() - self._beat > self.cfg.ps.timeout_s / 4:
            self.t.transport.call_sync(0, calls.heartbeat, self.t.worker)
            self._beat = time.monotonic()

    def run_round(self, units: list[int], reader, straggler) -> list[int]:
        """Pull, one inner step per unit, push Δ; the units leased next (none yet under sync rounds)."""
        t, cfg = self.t, self.cfg.train
        versions = self.transfers.fetch(prefetch=False)
        with torch.no_grad():
            if self.masters is not self.params:
                for name, master in self.masters.items():
                    master.copy_(self.params[name])
            pulled = {n: m.detach().clone() for n, m in self.masters.items()}
        per_step = cfg.global_batch_size // t.num_workers
        unit_losses, skipped, compute_s = [], 0, 0.0
        for unit in units:
            self._heartbeat()
            start = time.perf_counter()
            grad: dict[str, torch.Tensor] = {}
            loss = float(np.mean(unit_gradient(self.model, self.params, reader, unit, per_step,
                                               cfg.micro_batch_size, t.env.device, straggler, grad)))
            skipped += not self._inner_step(unit, grad, loss)
            compute_s += time.perf_counter() - start
            unit_losses.append(loss)
        with torch.no_grad():
            delta = {n: pulled[n].sub_(m.detach()) for n, m in self.masters.items()}
        finite = skipped < len(units) and all(bool(torch.isfinite(d).all()) for d in delta.values())
        stats = {"loss": float(np.mean(unit_losses)), "unit_losses": unit_losses, "finite_grads": finite,
                 "leases": units, "compute_s": compute_s / len(units), "inner_skipped": skipped}
        # the state of a round that ends at a checkpoint's step goes with its push (whole rounds: steps of W units)
        if self.cadence.save(versions[0] // t.num_workers + len(units)):
            stats["inner_state"] = self.state()
        return self.transfers.push(delta, versions, stats, wanted=self.cfg.ps.inner_steps, background=False,
                                   dtype=self.push_dtype, server0_last=self.cfg.ps.sync_rounds)

    def _inner_step(self, unit: int, grad: dict[str, torch.Tensor], loss: float) -> bool:
        """Clip and apply one inner step at the learning rate of the unit's global step; False if skipped."""
        for name, master in self.masters.items():
            master.grad = grad[name]
        norm = clip_([grad[name] for name in self.masters], self.cfg.optim.grad_clip or math.inf)
        applied = math.isfinite(loss) and bool(torch.isfinite(norm))
        if applied:
            set_lr(self.optimizer, lr_at(unit // self.t.num_workers, self.cfg.optim, self.cfg.train.max_steps))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if applied and self.masters is not self.params:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.masters[name])
        return applied

