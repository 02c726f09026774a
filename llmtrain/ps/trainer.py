"""The asynchronous trainer (mode=async_ps): ranks 0..S-1 are parameter servers, the others workers.

    torchrun --standalone --nproc_per_node 3 -m llmtrain.cli.train experiment=demo mode=async_ps

Workers loop without waiting for each other: pull every shard (concurrently) -> forward/backward on their own
slice of the data (the same resumable reader, worker index as rank) -> push each shard's gradient -> repeat.
Servers apply each gradient on arrival. The budget is the sync run's: W pushes of global_batch_size / W
sequences each make one "step", so train.max_steps means the same number of tokens in both modes.
Transport (``ps.transport``, ``llmtrain.ps.transport``): torch.distributed.rpc over TensorPipe, or gRPC, joined
through the launcher's MASTER_ADDR/MASTER_PORT rendezvous (the same environment as sync mode); over gRPC a worker
started later with ps.join=true joins the running job. Server 0 (rank 0) writes the metrics and the final model.
Precision: workers compute in ``precision`` (bf16 by default), pulls and pushes carry tensors of that dtype,
servers keep fp32 masters and optimizer state and apply in fp32.

Set-up, the run folder, the checkpoint procedure and resume rule, and the log/eval/save cadence are the synchronous
trainer's (``llmtrain.run``); this mode supplies its roles, its loop and its tensor files (``llmtrain.ps.checkpoint``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time

import numpy as np
import torch

from llmtrain.config import TrainConfig, Transport
from llmtrain.distributed import memory
from llmtrain.distributed.deepspeed import copy_weights, should_compile
from llmtrain.distributed.env import rendezvous_host, rpc_env
from llmtrain.dtypes import torch_dtype
from llmtrain.errors import UserError
from llmtrain.evaluate import mean_loss, validation_scores
from llmtrain.model import build_model
from llmtrain.ps import rpc as calls
from llmtrain.ps.checkpoint import ServerCheckpointIO
from llmtrain.ps.diloco import InnerRounds
from llmtrain.ps.grads import clip_, unit_gradient
from llmtrain.ps.job import check_joinable, check_workers, job_secret, job_settings, read_layout, write_layout
from llmtrain.ps.leases import UpdateLog
from llmtrain.ps.server import OuterServer, ParameterServer, RoundServer, shard_names
from llmtrain.ps.transfers import Transfers
from llmtrain.ps.transport import (
    Credentials,
    Grpc,
    PSTransport,
    TensorPipe,
    check_shard_sizes,
    reachable_host,
)
from llmtrain.run import setup
from llmtrain.run.cadence import Cadence
from llmtrain.run.checkpoint import Checkpoints, Peers, client_state, diverged
from llmtrain.run.metrics import MetricsLogger, last_scores
from llmtrain.run.preemption import StopSignals, clear_preempted, mark_preempted
from llmtrain.run.rundir import RunDir, read_state
from llmtrain.run.setup import TrainResult
from llmtrain.run.straggler import Straggler

log = logging.getLogger("llmtrain")

STOP_WAIT_S = 5.0
"""How long server 0 waits, after a stop signal, for the steps it stops at; then it ends the run at the version
applied (``ParameterServer.freeze``: the units lost workers still hold go back to the ledger) and writes its
checkpoint, well within a launcher's grace before SIGKILL (torchrun's and Slurm's: 30 s)."""


class AsyncPSTrainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        # 1. Roles from the launcher's environment: servers first, then workers. A worker that joins a running job
        #    (ps.join) takes the job's layout from its run folder instead, whatever its launcher rank.
        self.joined = cfg.ps.join
        run_dir = RunDir.of(cfg.run.dir)
        layout = read_layout(run_dir.servers, cfg.ps.timeout_s,
                             lambda: finished_at(run_dir, cfg.train.max_steps)) if self.joined else None
        self.num_servers = layout["num_servers"] if layout else cfg.ps.num_servers
        if layout and layout["num_servers"] != cfg.ps.num_servers:
            raise UserError(f"ps.join=true: the job in {cfg.run.dir} runs {layout['num_servers']} server(s) and this "
                            f"worker has ps.num_servers={cfg.ps.num_servers}; join with the job's config")
        self.env = rpc_env(cpu_ranks=0 if layout else self.num_servers)  # servers on the CPU; workers on their GPU
        world = self.env.world_size
        self.num_workers = layout["num_workers"] if layout else world - self.num_servers
        # a joined worker's place comes from server 0 once it is connected (``join``): any rank past the launched ones
        self.rank = rank = self.num_servers + self.num_workers if layout else self.env.rank
        if layout:  # the job's process 0 reports the run, not the first process of a joining launch
            self.env = dataclasses.replace(self.env, rank=rank)
        check_workers(cfg, self.num_servers, self.num_workers, world)
        self.is_server = rank < self.num_servers
        # A stop signal reaches every process of a Slurm job: server 0 decides when to stop, the others go on.
        # A joined worker listens too: its own job's signal (scancel of the second sbatch) makes it leave.
        self._signals = StopSignals(listen=rank == 0 or self.joined).install()
        self.worker = rank - self.num_servers
        self.dtype = torch_dtype(cfg.precision)
        """Workers compute, and pulls and pushes travel, in this dtype; servers keep fp32 masters."""
        # 2. Run folder and data: rank 0 prepares the dataset if needed, the others wait for it (no process
        #    group exists yet); the model config takes its vocabulary from it.
        started = setup.set_up_run(cfg, rank == 0)
        self.run, self.data, self.model_cfg, self.resolved = (started.run, started.data, started.model_cfg,
                                                               started.resolved)
        self.settings = job_settings(self.resolved, self.data)
        if layout:  # before the job hears of this worker: one of another model, budget or precision never joins
            check_joinable(layout, self.settings, self.run.path)
        # 3. The model, identical on every process (same seed, or model.init_from's weights); its tensors split
        #    among the servers.
        torch.manual_seed(cfg.train.seed)
        self._model = build_model(self.model_cfg, cfg.dist.activation_checkpointing)
        if started.initial is not None:
            copy_weights(self._model, started.initial.state_dict, zero_stage=0)
            started.initial = None
        self.start_step = self.resumed_step = self.start_version = 0
        sizes = [(n, p.numel()) for n, p in self._model.named_parameters()]  # a tied weight appears once
        self.shards = shard_names(sizes, self.num_servers)
        if cfg.ps.transport == Transport.grpc:  # on every process alike, before any waits for another
            numel = dict(sizes)
            check_shard_sizes([sum(numel[n] for n in shard) for shard in self.shards])
        # 4. Checkpoints: server 0 writes them (the shards of the others by RPC); each server resumes its own shard.
        shard_files = ServerCheckpointIO(rank, world, self.num_servers, self.num_workers,
                                         sum(p.numel() for p in self._model.parameters()), self._call_sync,
                                         self.gather_state, self.model_cfg, self.data.tokenizer)
        self.checkpoints = Checkpoints(self.run, shard_files, rpc_peers(rank, self._call_sync),
                                       cfg.train.keep_checkpoints, background=cfg.train.background_saves)
        # 5. Servers hold their shard before anyone can call them (they answer pulls once it is resumed).
        if self.is_server:
            params = dict(self._model.named_parameters())
            server = calls.install(self._build_server({n: params[n] for n in self.shards[rank]}))
            parts = memory.server_bytes(cfg, sum(params[n].numel() for n in self.shards[rank]), self.num_workers,
                                        sum(p.numel() for p in params.values()) if rank == 0 else 0)
            log.info("parameter server %d: %.2f GB predicted = %s", rank, sum(parts.values()) / memory.GB,
                     ", ".join(f"{k} {v / memory.GB:.2f}" for k, v in parts.items() if v))
            if rank == 0:
                server.on_give_back = self._revoke_elsewhere
                if isinstance(server, RoundServer):
                    server.on_close = self._close_elsewhere
        # 6. What the run starts from, decided by process 0 before it joins the RPC group (it reads the checkpoint's
        #    files through, which may take longer than an RPC may wait) and then asked for by every other process:
        #    all resume, or all leave with the same refusal. The resolved config is written once it was accepted.
        refused = self._agree_on_start() if rank == 0 else None
        self.config_yaml = setup.write_run_config(self.run, self.resolved) if rank == 0 and not refused else ""
        self.transport = self._connect(layout)
        refused = refused if rank == 0 else self._agree_on_start()
        if refused is not None:
            self.transport.leave_together()  # process 0 answers until all have asked
            raise refused
        # 7. Servers load their shard of the agreed checkpoint, then answer; server 0 evaluates in the workers'
        #    precision, as sync mode does. Workers compile where it pays.
        if self.is_server:
            if self._resume_from is not None:
                self.resumed_step = self.checkpoints.load(self._resume_from)["step"]
                # the run continues at the version saved, which need not end a step (a stop that could not wait
                # for lost workers' units, or Downpour's workers pushing while a save was copied)
                self.start_version = calls.server().version
                self.start_step = self.start_version // self.num_workers
            self._model.to(self.dtype)
            calls.server().start()
        elif should_compile(cfg.train.compile, self.env.device, zero_stage=0):
            self._model.compile()  # in place: the parameter names that pulls, pushes and checkpoints use stay

    def _build_server(self, shard: dict[str, torch.Tensor]) -> ParameterServer:
        """This server's role: Downpour's optimizer, or DiLoCo's outer one, in sync rounds (server 0 holding a round
        that ends at an evaluation or a save until its reporting thread has done it) or asynchronous ones."""
        cfg = self.cfg
        args = (shard, cfg.optim, cfg.train.max_steps, self.num_workers, cfg.ps.staleness_lr, cfg.ps.max_staleness,
                cfg.ps.timeout_s, cfg.train.stop_at_step)
        kwargs = {"wire_dtype": self.dtype, "max_nonfinite_steps": cfg.train.max_nonfinite_steps,
                  "owns_data_order": self.rank == 0}
        if not cfg.ps.diloco:
            return ParameterServer(*args, **kwargs)
        if not cfg.ps.sync_rounds:
            return OuterServer(*args, outer=cfg.ps, **kwargs)
        cadence = Cadence.of(cfg.train)
        return RoundServer(*args, outer=cfg.ps, holds=lambda step: cadence.evaluate(step) or cadence.save(step),
                           **kwargs)

    def name(self, rank: int) -> str:
        return f"ps{rank}" if rank < self.num_servers else f"worker{rank - self.num_servers}"

    def _connect(self, layout: dict | None) -> PSTransport:
        """The transport to the servers (a server answers on it from here on). Over gRPC, server 0 records where
        the servers answer in the run folder, and a joining worker reads it there and asks server 0 for its id."""
        ps = self.cfg.ps
        if ps.transport != Transport.grpc:
            return TensorPipe(self.rank, self.env.world_size, self.name, ps.timeout_s, ps.transport.value)
        # the job's secret: process 0 makes it; the launched processes read it in the rendezvous, a joiner in run.dir
        secret = job_secret(self.run.secret, create=self.rank == 0) if self.rank == 0 or layout else None
        transport = Grpc(ps.timeout_s, secret, Credentials(ps.tls_dir) if ps.tls_dir else None)
        if layout is not None:
            transport.join(layout["servers"])
            self.worker = transport.call_sync(0, calls.join)
            self.rank = self.num_servers + self.worker
            return transport
        address = None
        if self.is_server:
            # every call may block (a pull under max_staleness, a worker waiting for a lease), and workers may join:
            # threads to spare, so that a call that would release a waiting one is never queued behind it
            address = transport.serve(reachable_host(rendezvous_host()), threads=64 + 4 * self.num_workers)
        transport.rendezvous(self.rank, self.env.world_size, self.num_servers, address)
        if self.rank == 0:
            write_layout(self.run.servers, transport.addresses, self.num_servers, self.num_workers, self.settings)
        return transport

    def _call_sync(self, server: int, fn, *args):
        """``fn(*args)`` on ``server``: this process's own directly, another's through the transport."""
        if server == self.rank and self.is_server:
            return fn(*args)
        return self.transport.call_sync(server, fn, *args)

    # -- roles ---------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        # Shutdown is not graceful (that would wait for every process, a lost one included): each role leaves
        # only once nothing more is asked of it (workers after their last push, servers when released).
        try:
            with self._signals:
                return self._serve() if self.is_server else self._work()
        finally:
            if self.rank == 0:  # the job is over: no worker may join it any more
                self.run.servers.unlink(missing_ok=True)
            self.transport.close()

    def _call(self, server: int, fut):
        try:
            return fut.wait()
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or ["no answer"])[0][:160]
            raise UserError(f"worker {self.worker}: parameter server {self.name(server)} did not answer within "
                            f"ps.timeout_s={self.cfg.ps.timeout_s} s ({first}); stopping") from None

    def _work(self) -> TrainResult:
        """The worker's loop (Downpour's local steps, or DiLoCo's rounds), then its leaving: what it holds goes back
        on a stop signal, and server 0 last hears that it finished."""
        cfg = self.cfg.train
        model = self._model.to(self.env.device, self.dtype)
        reader = self.data.train_reader(self.model_cfg.block_size, cfg.seed, 0, 1, cfg.subset_tokens)
        transfers = Transfers(self, dict(model.named_parameters()))
        straggler = Straggler(cfg.slow_rank_factor, self.worker == self.num_workers - 1, self.env.device)
        if self.cfg.ps.diloco:
            result = self._rounds(InnerRounds(self, model, transfers), reader, straggler)
        else:
            result = self._local_steps(model, reader, transfers, straggler)
        transfers.close()
        if self.joined and self._signals.requested:
            self.transport.call_sync(0, calls.leave, self.worker)  # what it holds goes to the others now
            log.info("worker %d left the job (a stop signal) after %d local step(s)", self.worker, result.steps)
        stopped = self._call(0, self.transport.call(0, calls.diverged))  # asked before server 0 may leave
        # Server 0 last: once every worker has finished with it, it releases the others and may leave at once.
        for i in reversed(range(self.num_servers)):
            try:
                self.transport.call_sync(i, calls.finished, self.worker)
            except RuntimeError:
                if i:
                    raise
                # server 0 may leave before its answer arrives: nothing is lost
        if stopped is not None:
            raise diverged(self.run, *stopped, cfg.max_nonfinite_steps)
        if self.joined:
            log.info("worker %d computed %d local step(s) of the job in %s; its server 0 reports the run",
                     self.worker, result.steps, self.cfg.run.dir)
        return result

    def _local_steps(self, model, reader, transfers: Transfers, straggler: Straggler) -> TrainResult:
        """Downpour: local steps of global_batch_size / W sequences, on the units of data server 0 leases (unit u:
        sample positions [u * S, (u + 1) * S) of the reader's order, S = global_batch_size / W): every
        ``ps.fetch_every`` steps the weights are pulled, every ``ps.push_every`` the mean gradient is pushed (asking
        for the next lease). With ``ps.overlap`` the pull and the push run while the next steps compute
        (``Transfers``)."""
        cfg, ps = self.cfg.train, self.cfg.ps
        per_step = cfg.global_batch_size // self.num_workers
        wanted = (2 if ps.overlap else 1) * ps.push_every  # one push's units ahead while a push is in flight
        held = collections.deque(self._call(0, self.transport.call(0, calls.first_grant, self.worker, wanted)))
        params = transfers.params
        result, local, versions = TrainResult(), 0, []
        while True:
            if self.joined and self._signals.requested:  # a joined worker's own job was stopped: it leaves
                break
            if not held and not transfers.pushing:
                # Out of leases with nothing in flight, a worker waits for more until the budget is applied: what
                # other workers hold may come back to it (a lost worker's), so no step of the budget is left undone.
                held.extend(self._wait_grant(wanted))
                if not held:
                    break
            if not held:  # the lease for more comes with the push in flight
                held.extend(transfers.wait_push())
                continue
            units = [held.popleft() for _ in range(min(ps.push_every, len(held)))]
            losses, grad, compute_s = [], {}, 0.0
            for i, unit in enumerate(units):
                if local % ps.fetch_every == 0:
                    fetched = transfers.fetch(prefetch=ps.overlap)
                    versions = fetched if i == 0 else versions  # an update counts from its first step's weights
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                losses += unit_gradient(model, params, reader, unit, per_step, cfg.micro_batch_size, self.env.device,
                                        straggler, grad)
                compute_s += time.perf_counter() - start
                local += 1
            if len(units) > 1:
                for g in grad.values():
                    g.div_(len(units))  # the mean over the local steps: one update of a units-times larger batch
            norm = clip_(list(grad.values()), self.cfg.optim.grad_clip or math.inf)
            stats = {"loss": float(np.mean(losses)), "finite_grads": bool(torch.isfinite(norm)), "leases": units,
                     "compute_s": compute_s / len(units)}  # per local step
            held.extend(transfers.push(grad, versions, stats, wanted=ps.push_every, background=ps.overlap))
            result.steps += len(units)
        return result

    def _rounds(self, rounds: InnerRounds, reader, straggler: Straggler) -> TrainResult:
        """DiLoCo: a round per lease of up to ps.inner_steps units (``InnerRounds``), until none is left; the inner
        state goes to server 0 at the end, for the run's last checkpoint."""
        rounds.resume()
        wanted = self.cfg.ps.inner_steps
        held = self._call(0, self.transport.call(0, calls.first_grant, self.worker, wanted))
        result = TrainResult()
        while not (self.joined and self._signals.requested):
            if not held:
                held = self._wait_grant(wanted)
                if not held:
                    break
            units, held = held, rounds.run_round(held, reader, straggler)
            result.steps += len(units)
        self.transport.call_sync(0, calls.put_inner, self.worker, rounds.state())
        return result

    def _wait_grant(self, wanted: int) -> list[int]:
        """Units server 0 leases this worker once it holds none, waiting while the rest of the budget is leased to
        others; none once the budget is applied."""
        while True:
            given = self._call(0, self.transport.call(0, calls.wait_grant, self.worker, wanted,
                                                      self.cfg.ps.timeout_s / 4))
            if given is not None:
                return given

    def _close_elsewhere(self, workers: list[int]) -> None:
        """Server 0 closes a round: the other servers apply the same workers' pseudo-gradients first."""
        for i in range(1, self.num_servers):
            self.transport.call_sync(i, calls.close_round, workers)

    def _revoke_elsewhere(self, worker: int, units: list[int]) -> None:
        """Server 0 took ``units`` back from a lost ``worker``: the other servers refuse its push of them from now
        on (told before the units are leased again)."""
        for i in range(1, self.num_servers):
            self.transport.call_sync(i, calls.revoke, worker, units)

    def _serve(self) -> TrainResult:
        if self.rank == 0:
            return self._serve_and_report()
        calls.server().released.wait()  # server 0 still reads this shard for the final evaluation and model
        if calls.server().diverged is not None:
            raise diverged(self.run, *calls.server().diverged, self.cfg.train.max_nonfinite_steps)
        return TrainResult()

    def _serve_and_report(self) -> TrainResult:
        """Server 0: apply updates (on RPC threads) while this thread logs metrics and evaluates."""
        cfg = self.cfg.train
        server = calls.server()
        metrics = MetricsLogger(self.run, True, self.cfg.wandb, self.resolved, cfg.max_steps, self.start_step)
        clear_preempted(self.run)
        updates = UpdateLog(self.run.updates, server.version)
        result = TrainResult(unigram_entropy=self.data.unigram_entropy())
        self._lost: list[bool] = []
        cadence = Cadence.of(cfg)
        # units: local steps applied since the start of the step in progress (some may be the resumed checkpoint's)
        start_units = self.start_version - self.start_step * self.num_workers
        seen, units, step = 0, start_units, self.start_step
        # tokens/s: over at least the last second (a DiLoCo update ends many steps at once, and two workers' updates
        # may land milliseconds apart), from the first update on
        rate, rate_units, rate_time = 0.0, start_units, time.time()
        evaluated, saved = -1, self.resumed_step if self._resume_from is not None else -1
        interval: list[dict] = []
        this_step: list[dict] = []  # the updates of the step in progress
        # The loss of step s: the mean over the W units of data applied as step s (in the order applied; a DiLoCo
        # round reports each inner step's loss, in a sync round worker after worker)
        unit_losses: collections.deque[float] = collections.deque()
        done = threading.Thread(target=lambda: self._lost.append(not server.wait_until_done()), daemon=True)
        done.start()
        running, stopping = True, None
        while running:
            running = done.is_alive()  # read once more after the end: the last updates land just before it
            done.join(timeout=0.2)
            if self._signals.requested and stopping is None:
                self._stop_soon()
                stopping = time.monotonic()
            if stopping is not None and running and server.frozen_at is None and \
                    time.monotonic() - stopping > STOP_WAIT_S:
                self._freeze()
            with server.lock:
                new = server.records[seen:]
            for i, record in enumerate(new):  # W local steps make one step (as many tokens as one synchronous step)
                updates.write(record)
                seen += 1
                units += record["units"]
                unit_losses.extend(record.get("unit_losses") or [record["loss"]] * record["units"])
                interval.append(record)
                this_step.append(record)
                while step < self.start_step + units // self.num_workers:  # an update of K local steps may end several
                    step += 1
                    metrics.advance()
                    # the first step's units applied before a resume are not here: its loss is the rest's
                    need = self.num_workers - (start_units if step == self.start_step + 1 else 0)
                    loss = float(np.mean([unit_losses.popleft() for _ in range(min(need, len(unit_losses)))]))
                    if any(r["skipped"] for r in this_step):
                        log.warning("step %d skipped (a worker's loss or gradient was non-finite)", step)
                    if cadence.log(step):
                        # units applied by now, with the records applied at the same moment (a sync round's)
                        applied = units + sum(r["units"] for r in new[i + 1:] if r["time"] == record["time"])
                        span = record["time"] - rate_time
                        if applied > rate_units and span > 0 and (span >= 1.0 or not rate):
                            rate = (applied - rate_units) * self._tokens_per_unit() / span
                            rate_units, rate_time = applied, record["time"]
                        self._log(metrics, step, interval or this_step, loss, rate)
                        result.losses[step] = loss
                        interval = []
                    this_step = [record] if units > (step - self.start_step) * self.num_workers else []
                    # the last step's evaluation and save wait for every update (below)
                    if not cadence.stops(step) and cadence.evaluate(step):  # on the weights of now (Downpour's
                        self._evaluate_into(result, metrics, step)  # workers go on meanwhile; DiLoCo's sync
                        evaluated = step  # rounds wait for it: ``RoundServer.holds``)
                    if not cadence.stops(step) and cadence.save(step):
                        self._save(step)
                        saved = step
                    server.proceed(step)
        updates.close()
        if self._lost[0] and server.frozen_at is None:
            log.warning("%d worker(s) were lost (silent for more than ps.timeout_s=%d s); the others finished "
                        "the run", len(server.clock) - len(server.finished), self.cfg.ps.timeout_s)
        result.steps, result.stopped_early = step, step < cfg.max_steps
        result.skipped_steps = server.skipped_steps
        if server.diverged is not None:  # no evaluation, no save: as a synchronous run, it stops at once
            metrics.close()
            error = self.checkpoints.diverged(*server.diverged, cfg.max_nonfinite_steps)
            self._release_servers(server.diverged)
            raise error
        frozen = server.frozen_at is not None
        # a frozen run's checkpoint is named by the step in progress (it holds part of it), after every earlier one
        last = -(-server.version // self.num_workers) if frozen else step
        if server.version == self.start_version:  # finished already: nothing was trained, its last scores stand
            scores = last_scores(self.run, step)
            result.val_loss, result.val_ppl = scores.get("val_loss", math.nan), scores.get("val_ppl", math.nan)
        elif cadence.evaluate(step) and evaluated != step and not frozen:
            self._evaluate_into(result, metrics, step)
        metrics.close()
        if saved != last and server.version != self.start_version:  # a run always ends with a checkpoint
            self._save(last, last=True, version=server.version if frozen else None)
        try:
            self.checkpoints.in_flight.wait("at the end")  # the other servers write their shards until then
        finally:
            if stopping is not None and result.stopped_early:
                mark_preempted(self.run, last, self._signals.requested)
            self._release_servers(None)
        return result

    def _freeze(self) -> None:
        """A stop signal's steps were not applied within ``STOP_WAIT_S`` (lost workers hold some of their units):
        every server ends the run at the version it has applied (server 0 last: the others may be ahead by the pushes
        in flight to it, as when a worker is lost between its pushes), for a checkpoint of part of a step."""
        for i in range(1, self.num_servers):
            self.transport.call_sync(i, calls.freeze)
        version = calls.freeze()
        held = calls.server().leases.outstanding(calls.server().clock)
        log.warning("stopping at once, after %g s: %d local step(s) of data are still held by workers that have not "
                    "pushed them (lost?); the checkpoint holds %d of the %d local steps of step %d, and a resumed run "
                    "leases the rest first", STOP_WAIT_S, held, version % self.num_workers, self.num_workers,
                    -(-version // self.num_workers))

    def _release_servers(self, stopped: tuple[int, int] | None) -> None:
        """Let the other servers leave, telling them whether the run diverged (``stopped``: its non-finite steps)."""
        for i in range(1, self.num_servers):
            try:
                self.transport.call_sync(i, calls.release, stopped)
            except RuntimeError:  # the released server may leave before its answer arrives: nothing is lost
                pass

    def _stop_soon(self) -> None:
        """End the run at a step boundary every server can still reach: pushes in flight put another server at
        most one update per worker ahead of this one, so two steps from here is safe (or later, where server 0
        granted local steps beyond it: they are applied first). The other servers take server 0's budget."""
        steps_done = calls.server().version // self.num_workers
        budget = calls.stop_at((steps_done + 2) * self.num_workers)
        log.info("stopping at step %d (a stop signal arrived); then a checkpoint", budget // self.num_workers)
        for i in range(1, self.num_servers):
            self.transport.call_sync(i, calls.stop_at, budget)

    def _log(self, metrics: MetricsLogger, step: int, records: list[dict], loss: float, tokens_per_s: float) -> None:
        """A metrics row of the updates since the last one (``records``; an update of several local steps may end
        more than one logged step: the rows after its first repeat its rate); ``loss`` is the step's. Bytes per
        token: what the workers pulled and pushed (sent + received) per token they trained on."""
        staleness = np.array([r["staleness"] for r in records])
        units = sum(r["units"] for r in records)
        metrics.log(step, {
            "loss": loss, "lr": records[-1]["lr"],
            "tokens_seen": self._tokens_seen(step), "tokens_per_s": tokens_per_s,
            "updates_per_s": tokens_per_s / self._tokens_per_unit() / (units / len(records)),
            "staleness_mean": float(staleness.mean()), "staleness_p50": float(np.percentile(staleness, 50)),
            "staleness_p95": float(np.percentile(staleness, 95)), "staleness_max": int(staleness.max()),
            "apply_s": float(np.mean([r["apply_s"] for r in records])),
            "pull_s": float(np.mean([r["pull_s"] for r in records])),
            "push_s": float(np.mean([r["push_s"] for r in records if r["push_s"]] or [0.0])),
            "bytes_per_update": float(np.mean([r["bytes"] for r in records])),
            "bytes_per_token": sum(r["bytes"] for r in records) / (self._tokens_per_unit() * units),
            "staleness_hist": np.bincount(staleness).tolist(),
            "compute_s": float(np.mean([r["compute_s"] for r in records])),
            **{f"loss_worker{w}": float(np.mean([r["loss"] for r in records if r["worker"] == w]))
               for w in sorted({r["worker"] for r in records})},
            **{f"compute_s_worker{w}": float(np.mean([r["compute_s"] for r in records if r["worker"] == w]))
               for w in sorted({r["worker"] for r in records})},
        })

    # -- the whole model, on server 0 ------------------------------------------------------------------------
    def gather_state(self) -> dict[str, torch.Tensor]:
        """Every shard's fp32 master weights (this server's directly, the others' by RPC)."""
        state = {}
        for i in range(self.num_servers):
            state.update(self._call_sync(i, calls.read_shard))
        return state

    def evaluate(self) -> dict[str, float]:
        """The validation loss of each source and their weighted total, on the servers' weights of now."""
        model = self._model
        model.load_state_dict(self.gather_state(), strict=False)
        model.eval()
        parts = self.data.validation(self.model_cfg.block_size, self.cfg.train.eval_windows)
        bs = self.cfg.train.micro_batch_size
        losses = [mean_loss(model, part.windows.batches(bs), torch.device("cpu"))[0] for part in parts]
        model.train()
        return validation_scores(parts, losses)

    def _evaluate_into(self, result: TrainResult, metrics: MetricsLogger, step: int) -> None:
        scores = self.evaluate()
        result.val_loss, result.val_ppl = scores["val_loss"], scores["val_ppl"]
        metrics.log(step, scores)

    def _tokens_per_unit(self) -> int:
        """Tokens of one unit of data (one local step: global_batch_size / W sequences)."""
        return self.cfg.train.global_batch_size // self.num_workers * self.model_cfg.block_size

    def _tokens_seen(self, step: int) -> int:
        """Tokens trained on after ``step`` steps (W updates of global_batch_size / W sequences each)."""
        return step * self.cfg.train.global_batch_size * self.model_cfg.block_size

    def _save(self, step: int, last: bool = False, version: int | None = None) -> None:
        """A checkpoint named ``step``; of part of that step where ``version`` (the local steps applied) ends none:
        its state records them, and its tokens are theirs."""
        tokens = self._tokens_seen(step) if version is None else version * self._tokens_per_unit()
        state = client_state(step, tokens, self.data.tokenizer_fingerprint, self.model_cfg, self.cfg.train.seed)
        if version is not None and version % self.num_workers:
            state["partial_step"] = {"version": version, "units_applied": version % self.num_workers,
                                     "units_per_step": self.num_workers,
                                     "lr_step": version // self.num_workers}
        self.checkpoints.save(step, state, self.config_yaml, last=last)

    def _agree_on_start(self) -> UserError | None:
        """The checkpoint to continue from (``Checkpoints.verdict``: process 0 decides, the others ask it), kept
        for the servers to load; or the refusal every process leaves with."""
        try:
            self._resume_from = self.checkpoints.verdict(self.cfg.run.resume, self.data.tokenizer_fingerprint,
                                                         self.model_cfg)
        except UserError as exc:
            return exc
        return None


def finished_at(run: RunDir, max_steps: int) -> int | None:
    """The step of the run's newest complete checkpoint where it ends a budget of ``max_steps`` (and holds no part
    of a step only), else None."""
    found = run.complete()
    if not found or found[-1][0] < max_steps or "partial_step" in read_state(found[-1][1]):
        return None
    return found[-1][0]


def rpc_peers(rank: int, call_sync) -> Peers:
    """The processes of the parameter-server mode as checkpoint peers: process 0 decides and publishes its decision
    (before or after the transport is up); every other process asks it for the same decision (``call_sync``)."""
    asked = itertools.count()

    def share(value: str) -> str:
        index = next(asked)
        if rank == 0:
            calls.publish(value)
            return value
        return call_sync(0, calls.shared, index)

    return Peers(is_main=rank == 0, share=share)
