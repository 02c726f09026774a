"""The synchronous trainer: a GPT under DeepSpeed ZeRO, with exact resume, evaluation and metrics.

    llmtrain-train data.dir=data/stdlib run.dir=runs/small model=small
    torchrun --nproc_per_node 2 -m llmtrain.cli.train data.dir=data/stdlib run.dir=runs/z2 model=small dist.zero_stage=2

``Trainer.__init__`` builds its components in a fixed order (each needs the ones above it); ``fit`` runs the
loop. Alternative training modes subclass ``Trainer`` rather than branching inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llmtrain.config import Precision, TrainConfig, parallel_problems
from llmtrain.data.reader import DeviceBatches, ValidationWindows
from llmtrain.distributed import memory
from llmtrain.distributed.deepspeed import (
    build_ds_config,
    build_partitioned,
    clip_whole_gradients,
    copy_weights,
    initialize,
    should_compile,
    trainer_clips,
)
from llmtrain.distributed.env import DistEnv, init_distributed
from llmtrain.distributed.experts import apply_expert_parallel
from llmtrain.distributed.parallel import Topology, parallelize, sequence_loss_scale
from llmtrain.distributed.traffic import data_parallel_bytes_per_step
from llmtrain.dtypes import torch_dtype
from llmtrain.errors import AgreedError
from llmtrain.evaluate import validation_scores
from llmtrain.model import build_model
from llmtrain.optim import build_optimizer, lr_at, set_lr
from llmtrain.run import setup
from llmtrain.run.cadence import Cadence, NonfiniteStreak
from llmtrain.run.checkpoint import Checkpoints, client_state
from llmtrain.run.metrics import MetricsLogger, last_scores, peak_flops, peak_memory_gb
from llmtrain.run.preemption import StopSignals, clear_preempted, mark_preempted
from llmtrain.run.setup import TrainResult
from llmtrain.run.straggler import Straggler
from llmtrain.train.checkpoint import DeepSpeedCheckpointIO, process_group_peers
from llmtrain.train.routing import Routing

log = logging.getLogger("llmtrain")


@dataclass
class StepOutcome:
    """What one optimizer step reports, read back to the host in one piece (``Trainer._exchange``)."""

    loss: float
    """Mean loss over the global batch."""
    norm: float
    """Gradient norm before clipping where the trainer clips; NaN where DeepSpeed does (``Trainer._grad_norm``)."""
    stop_signal: int
    """The highest stop-signal number any rank received (0 = none): every rank stops after this step alike."""
    applied: bool = True
    """False when the update was skipped (non-finite loss or gradients)."""


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        # 1. Distributed environment: every component below takes rank / world size from it.
        self.env: DistEnv = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        self.topology = Topology.of(cfg.dist, self.env.rank, self.env.world_size)  # world = pp x dp x tp x sp
        self.signals = StopSignals().install()  # a stop request during set-up is kept for the first step
        self._check_hardware()
        self.compiled = should_compile(cfg.train.compile, self.env.device, cfg.dist.zero_stage,
                                       self.topology.pp > 1)
        # 2-3. The run folder (the same path on every rank: it comes from the config, never from a clock) and the
        #      data (prepared by rank 0 when data.dir holds none yet, then opened by all); the model config
        #      takes its vocabulary from it.
        started = setup.set_up_run(cfg, self.env.is_main, dist.barrier)
        self.run, self.data, self.model_cfg = started.run, started.data, started.model_cfg
        self.run_dir = self.run.path
        # 4. The DeepSpeed config (ZeRO stage, precision, accumulation, clipping, buckets, compile), then the model:
        #    identical initial weights on every rank (same seed, or model.init_from's weights copied in); under
        #    ZeRO-3 built partitioned. Its size is counted on a meta-device copy (a partitioned model counts only
        #    its shard).
        #    The memory it will take is predicted first (and warned about when it cannot fit).
        problems = parallel_problems(self.model_cfg, cfg.dist)  # a model.init_from model's own sizes
        if problems:
            raise AgreedError("; ".join(problems))
        self.ds_config = build_ds_config(cfg, self.topology.dp, self.compiled, self.model_cfg)
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        self.trainer_clips = trainer_clips(cfg)
        with torch.device("meta"):
            shape = build_model(self.model_cfg)
        self.num_params = shape.num_params()
        self.active_params = shape.active_params()  # per token: k of a mixture's experts
        self.flops_per_token = shape.flops_per_token()
        all_params = shape.num_params(non_embedding=False)
        self.predicted_memory = self._predict_memory(all_params)
        held = (memory.stage_params(self.model_cfg, self.topology.pp, cfg.dist.pipeline_partition)[self.topology.stage]
                if self.topology.pp > 1 else memory.rank_params(self.model_cfg, all_params, self.topology.tp))
        self.bytes_per_token = (data_parallel_bytes_per_step(held,
            self.topology.dp, cfg.dist.zero_stage, self.grad_accum, torch_dtype(cfg.precision).itemsize)
            / (cfg.train.global_batch_size // self.topology.dp * self.model_cfg.block_size))
        """Data-parallel bytes a rank sends + receives per token it trains on (``llmtrain.distributed.traffic``)."""
        self._memory_reported = False  # the measured peak is logged beside it once, at the first logged step
        # 5. The model, the layout's parallel pieces, the optimizer and the DeepSpeed engine (``_build_engine``).
        self.engine = self._build_engine(started)
        started.initial = None  # its weights are in the model now; a resumed checkpoint replaces them (step 7)
        self.routing = Routing.of(self.engine.module, self.model_cfg, cfg.train, self.engine.device, self.env.is_main)
        # 6. Data readers: this data-parallel rank's training windows (the same on every rank of a tensor- or
        #    sequence-parallel group; each sequence-parallel rank computes its positions of them); the fixed
        #    validation set.
        block = self.model_cfg.block_size
        self.positions = self.topology.positions(block)
        self.loss_scale = sequence_loss_scale(self.topology, cfg.dist.zero_stage)  # of each shard's mean loss
        last = self.env.rank == self.env.world_size - 1
        self.straggler = Straggler(cfg.train.slow_rank_factor, last, self.env.device)  # a simulated slow rank
        reader = self.data.train_reader(block, cfg.train.seed, self.topology.dp_rank, self.topology.dp,
                                        cfg.train.subset_tokens)
        self.batches = DeviceBatches(reader, cfg.train.micro_batch_size, self.engine.device)
        self.val = self.data.validation(block, cfg.train.eval_windows)
        # 7. Checkpoints, and auto-resume from the newest intact one (or, with run.resume=restart, the folder's
        #    earlier history moved aside): rank 0 decides, every rank takes its verdict.
        tokenizer_copy = {self.data.tokenizer_file.name: self.data.tokenizer_file}  # checkpoints stand on their own
        background = self.background_saves
        engine_files = DeepSpeedCheckpointIO(self.engine, self.topology, cfg.dist.zero_stage, background,
                                             cfg.train.buffer_bytes, self.model_cfg)
        self.checkpoints = Checkpoints(self.run, engine_files, process_group_peers(self.env.rank, background),
                                       cfg.train.keep_checkpoints, tokenizer_copy, background)
        self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
        self._resume()
        resolved = started.resolved
        self.config_yaml = setup.write_run_config(self.run, resolved) if self.env.is_main else ""
        # 8. Metrics (rank 0 writes), with the peak FLOP/s that MFU is measured against: measured by rank 0 alone
        #    where no data sheet gives it (a few tenths of a second of matmuls at every start; only rank 0's row
        #    carries MFU).
        self.peak_flops, peak_source = (peak_flops(self.env.device, torch_dtype(cfg.precision)) if self.env.is_main
                                        else (math.nan, "rank 0's"))
        self.metrics = MetricsLogger(self.run, self.env.is_main, cfg.wandb, resolved, cfg.train.max_steps,
                                     self.step)
        if self.env.is_main:
            log.info("model %s: %.2fM parameters (non-embedding, %.2fM active per token), %.3g FLOPs/token; ZeRO-%d, "
                     "%s, %s, %s on %s, "
                     "global batch %d = %d micro x %d accumulation x %d data-parallel ranks; peak %.3g FLOP/s (%s)",
                     self.model_cfg.name, self.num_params / 1e6, self.active_params / 1e6, self.flops_per_token,
                     cfg.dist.zero_stage,
                     cfg.precision.value, "compiled" if self.compiled else "eager", self.topology.describe(),
                     self.env.device.type, cfg.train.global_batch_size, cfg.train.micro_batch_size, self.grad_accum,
                     self.topology.dp, self.peak_flops, peak_source)

    # -- set-up helpers -------------------------------------------------------------------------------------
    def _build_engine(self, started: setup.RunSetup):
        """The model (same seed on every rank, or model.init_from's weights copied in), sequence parallel applied
        (tensor parallel is DeepSpeed's, inside initialize, from the config), the optimizer, the engine."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        model = build_partitioned(lambda: build_model(self.model_cfg, cfg.dist.activation_checkpointing,
                                                      initialize=started.initial is None), self.ds_config)
        if started.initial is not None:
            copy_weights(model, started.initial.state_dict, cfg.dist.zero_stage)
        mpu = parallelize(model, self.topology)
        if self.topology.ep > 1:
            apply_expert_parallel(model, self.topology.ep)
        optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.dist.offload_optimizer, self.env.device,
                                    expert_groups=self.topology.ep > 1)
        return initialize(model, optimizer, self.ds_config, self.compiled, mpu)

    def _predict_memory(self, total_params: int) -> memory.MemoryEstimate:
        """Rank 0 logs the predicted peak per rank and, when it exceeds the memory visible to a rank, one warning
        naming the single changes that would make it fit. Every rank refuses in one line, before allocating, a
        run whose model states alone (weights, gradients, optimizer: no estimate in them) exceed that memory.
        Sets ``background_saves``: train.checkpoint_async, where auto saves synchronously when the prediction
        fits only without the host copies of background saves, on any rank (every rank alike)."""
        on_gpu = self.env.device.type == "cuda"
        baseline = 0.0 if on_gpu else memory.process_baseline()  # CUDA's peak counts tensors only
        predicted = memory.estimate(self.cfg, total_params, self.env.world_size, baseline, on_gpu, self.model_cfg)
        visible = memory.visible_bytes(self.env.device, self.env.local_world_size)
        direct = dataclasses.replace(predicted, checkpoint_copy=0.0)
        copy_misfits = memory.only_direct_saves_fit(self.cfg, predicted, visible)
        # Any rank that cannot hold its model states makes every rank refuse, and any rank whose copies do not fit
        # makes every rank save synchronously: none may wait at a collective alone.
        flags = torch.tensor([float(predicted.model_states > visible), float(copy_misfits)], device=self.env.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        too_big, copy_misfits = bool(flags[0].item()), bool(flags[1].item())
        self.background_saves = self.cfg.train.background_saves and not copy_misfits
        if copy_misfits:
            if self.env.is_main:
                log.info("train.checkpoint_async=auto: saving synchronously; predicted %.2f GB per rank with a "
                         "background save's host copies, %.2f GB without, %.2f GB visible to each",
                         predicted.total / memory.GB, direct.total / memory.GB, visible / memory.GB)
            predicted = direct
        if self.env.is_main:
            log.info("memory per rank, predicted: %s", predicted.describe())
        if predicted.total > visible or too_big:
            fits = memory.what_would_fit(self.cfg, total_params, self.env.world_size, baseline, visible, on_gpu,
                                         self.model_cfg)
            advice = ("it would fit with: " + "; ".join(fits) if fits else
                      "no ZeRO stage, offload, activation checkpointing, micro-batch or rank count makes it fit")
            if too_big:
                raise AgreedError(f"{total_params:,} parameters need {predicted.model_states / memory.GB:,.1f} GB of "
                                  f"model states per rank, more than the {visible / memory.GB:,.1f} GB visible to "
                                  f"each; {advice}")
            if self.env.is_main:
                log.warning("predicted %.1f GB per rank, more than the %.1f GB visible to each; %s",
                            predicted.total / memory.GB, visible / memory.GB, advice)
        return predicted

    def _check_hardware(self) -> None:
        if self.cfg.precision == Precision.fp16 and self.env.device.type != "cuda":
            raise AgreedError("precision=fp16 needs a CUDA GPU; on CPU use precision=bf16 or precision=fp32")

    def _client_state(self) -> dict[str, Any]:
        """What continues a run exactly besides DeepSpeed's tensors. No RNG state: see train_step."""
        return client_state(self.step, self.tokens_seen, self.data.tokenizer_fingerprint, self.model_cfg,
                            self.cfg.train.seed, skipped_steps=self.skipped_steps, reader=self.batches.state_dict())

    def _resume(self) -> None:
        client = self.checkpoints.resume(self.cfg.run.resume, self.data.tokenizer_fingerprint, self.model_cfg)
        if client is None:
            return
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.skipped_steps = client["skipped_steps"]
        self.batches.load_state_dict(client["reader"])

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, result = self.cfg.train, TrainResult(unigram_entropy=self.data.unigram_entropy())
        cadence = Cadence.of(cfg)
        tokens_per_step = cfg.global_batch_size * self.model_cfg.block_size
        nonfinite, interval_start, interval_steps = NonfiniteStreak(cfg.max_nonfinite_steps), time.perf_counter(), 0
        if self.env.is_main:
            clear_preempted(self.run)
            if self.step >= cfg.max_steps:  # finished already: nothing to train or evaluate, its last scores stand
                scores = last_scores(self.run, self.step)
                result.val_loss, result.val_ppl = scores.get("val_loss", math.nan), scores.get("val_ppl", math.nan)
        with self.signals, contextlib.closing(self.metrics), self.checkpoints.in_flight:
            while self.step < cfg.max_steps:
                outcome = self.train_step()
                loss = outcome.loss
                self.step += 1
                self.tokens_seen += tokens_per_step
                interval_steps += 1
                result.losses[self.step] = loss
                if not outcome.applied:
                    self.skipped_steps += 1
                    log.warning("step %d skipped (loss %s, grad norm %s)", self.step, loss, self._grad_norm(outcome))
                # A skipped step had a non-finite loss or gradient -- except fp16's skips of a finite loss: its loss
                # scaler skips overflowing steps as it lowers the scale. Every rank counts alike (all-reduced).
                overflow = self.cfg.precision == Precision.fp16 and math.isfinite(loss)
                if nonfinite.add(self.step, outcome.applied or overflow):
                    raise self.checkpoints.diverged(nonfinite.first, self.step, nonfinite.limit)
                self.metrics.advance()
                if cadence.log(self.step):
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_steps * tokens_per_step / elapsed
                    self._log_step(loss, self._grad_norm(outcome), tokens_per_s, elapsed / interval_steps,
                                   interval_steps)
                    interval_start, interval_steps = time.perf_counter(), 0
                if cadence.evaluate(self.step):
                    scores = self.evaluate()
                    result.val_loss, result.val_ppl = scores["val_loss"], scores["val_ppl"]
                    self.metrics.log(self.step, scores)
                signum = outcome.stop_signal
                if cadence.save(self.step, bool(signum)):
                    self.checkpoints.save(self.step, self._client_state(), self.config_yaml,
                                          last=cadence.stops(self.step, bool(signum)))
                if cadence.stops(self.step, bool(signum)) and not cadence.is_last(self.step):
                    result.stopped_early = True
                    if signum and self.env.is_main:
                        mark_preempted(self.run, self.step, signum)
                    log.info("stopped at step %d with a checkpoint; re-run the same command to continue", self.step)
                    break
        result.steps, result.skipped_steps = self.step, self.skipped_steps
        return result

    def train_step(self) -> StepOutcome:
        """One optimizer step over ``grad_accum`` micro-batches.

        The host waits for the device once per step (a GPU keeps its queue full): one collective and one read
        back of a small tensor carry the global loss, a stop signal received by any rank and, where the trainer
        clips, the gradient norm. DeepSpeed's norm is read only on log steps."""
        cfg, engine = self.cfg, self.engine
        set_lr(engine.optimizer, lr_at(self.step, cfg.optim, cfg.train.max_steps))
        loss_sum = torch.zeros((), device=engine.device)
        for micro in range(self.grad_accum):
            self._seed_dropout(micro)
            x, y = self.batches.next()
            with self.straggler.micro_batch():
                loss = self._forward(x, y)
                objective = self.routing.objective(loss)  # + a mixture of experts' router losses
                engine.backward(objective * self.loss_scale if self.loss_scale != 1 else objective)
            loss_sum += loss.detach().float()
            discard = False
            if micro == self.grad_accum - 1:  # gradients are whole now (ZeRO-0) or reduced into partitions
                norm = self._clip() if self.trainer_clips else None
                outcome = self._exchange(loss_sum / self.grad_accum, norm)
                discard = self.trainer_clips and not (math.isfinite(outcome.loss) and math.isfinite(outcome.norm))
            if discard:
                self._drop_gradients()
            if micro == self.grad_accum - 1:  # the update: a background save must have read the weights first
                self.checkpoints.before_update(self.step + 1)
            engine.step()  # applies the update at the accumulation boundary only
        outcome.applied = math.isfinite(outcome.loss) and not discard and engine.was_step_applied()
        return outcome

    def _seed_dropout(self, micro: int) -> None:
        """Dropout masks depend only on (seed, step, micro-step, rank): resuming needs no RNG state. The ranks of a
        tensor-parallel group draw the same masks (see Topology.dropout_rank)."""
        torch.manual_seed(hash((self.cfg.train.seed, self.step, micro, self.topology.dropout_rank)) % (1 << 62))

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of this rank's positions of the batch: all of them, or under sequence parallel its slice,
        whose positions start where the slice does."""
        if self.topology.sp == 1:
            return self.engine(x, y)[1]
        start, stop = self.positions
        return self.engine(x[:, start:stop], y[:, start:stop], start=start)[1]

    def _clip(self) -> torch.Tensor:
        """Clip whole gradients (ZeRO-0 in fp32, which DeepSpeed hands straight to the torch optimizer) in one
        norm pass, left on the device: the norm before clipping."""
        return clip_whole_gradients(self.engine, self.cfg.optim.grad_clip or math.inf)

    def _exchange(self, loss: torch.Tensor, norm: torch.Tensor | None) -> StepOutcome:
        """All-reduce [loss, one slot per signal number], read it back with the norm: the step's one sync."""
        slots = torch.zeros(signal.NSIG, device=loss.device)
        if self.signals.requested:  # a signal may reach some ranks only: all stop at this step
            slots[self.signals.requested] = 1.0
        packed = torch.cat([loss.view(1), slots])
        dist.all_reduce(packed)
        norm = norm.view(1).double() if norm is not None else packed.new_full((1,), math.nan, dtype=torch.float64)
        values = torch.cat([packed.double(), norm]).tolist()
        stop = max((signum for signum, seen in enumerate(values[1:-1]) if seen), default=0)
        return StepOutcome(loss=values[0] / self.env.world_size, norm=values[-1], stop_signal=stop)

    def _grad_norm(self, outcome: StepOutcome) -> float:
        """The step's gradient norm before clipping: the trainer's own, else DeepSpeed's (ZeRO 1-3, bf16, fp16),
        read on log steps only."""
        if self.trainer_clips:
            return outcome.norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def _drop_gradients(self) -> None:
        """Make the coming update a no-op where the trainer clips (ZeRO-0 in fp32): the torch optimizer skips
        parameters without a gradient. ZeRO 1-3, bf16 and fp16 skip non-finite gradients themselves."""
        for p in self.engine.module.parameters():
            p.grad = None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the fixed validation windows of each source, and their weighted total
        (``validation_scores``); the same numbers for any world size."""
        self.engine.eval()
        totals = torch.zeros(len(self.val), 2, dtype=torch.float64, device=self.engine.device)
        for part, total in zip(self.val, totals, strict=True):
            self._score(part.windows, total)
        dist.all_reduce(totals)
        self.engine.train()
        return validation_scores(self.val, (totals[:, 0] / totals[:, 1]).tolist())

    def _score(self, val: ValidationWindows, total: torch.Tensor) -> None:
        """Add this rank's share of ``val``: [summed loss, target count] into ``total``, on the device."""
        batches, num_batches, stand_in = self._val_batches(val)
        for i in range(num_batches):
            x, y = batches[min(i, len(batches) - 1)] if batches else stand_in
            loss = self._forward(x.to(self.engine.device), y.to(self.engine.device))
            if i < len(batches):  # every rank of a tensor- or sequence-parallel group adds its share alike
                targets = y.numel() // self.topology.sp
                total[0] += loss.double() * targets
                total[1] += targets

    def _val_batches(self, val: ValidationWindows) -> tuple[list, int, tuple[torch.Tensor, torch.Tensor]]:
        """This data-parallel rank's micro-batches of ``val``; how many forwards every rank runs (the most any rank
        has: ZeRO-3 gathers parameters inside forward, and a pipeline's eval_batch is collective, so every rank
        runs as many); and a batch of the right shape for a rank that has none left."""
        bs, dp = self.cfg.train.micro_batch_size, self.topology.dp
        batches = list(val.batches(bs, self.topology.dp_rank, dp))
        return batches, math.ceil(math.ceil(len(val) / dp) / bs), batches[0] if batches else next(val.batches(bs, 0, 1))

    def _log_step(self, loss: float, grad_norm: float, tokens_per_s: float, step_time: float, steps: int) -> None:
        optimizer = self.engine.optimizer
        row = {
            "loss": loss,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.env.world_size),
            "step_time_s": step_time,
            "peak_mem_gb": peak_memory_gb(self.env.device),
            "loss_scale": float(getattr(optimizer, "cur_scale", 1.0) or 1.0),
            "skipped_steps": self.skipped_steps,
            "bytes_per_token": self.bytes_per_token,
            **{f"tokens_seen/{name}": samples * self.model_cfg.block_size
               for name, samples in self.batches.samples_by_source().items()},
            **self.routing.metrics(steps),
        }
        self.metrics.log(self.step, row)
        if self.env.is_main and not self._memory_reported:
            self._memory_reported = True
            log.info("memory per rank: predicted %.2f GB, measured peak %.2f GB (rank 0, after step %d)",
                     self.predicted_memory.total / memory.GB, row["peak_mem_gb"], self.step)
