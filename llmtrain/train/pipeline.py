"""The synchronous trainer on a pipeline layout (dist.pipeline_parallel > 1): the same loop, set-up, cadence,
checkpoints and signals as ``Trainer``; only the step and the evaluation go through DeepSpeed's pipeline engine
(``train_batch`` runs forward, backward and the update of a whole step; ``eval_batch`` the forwards).

    torchrun --nproc_per_node 2 -m llmtrain.cli.train data.dir=... run.dir=... model=tiny dist.pipeline_parallel=2

What the plain step does per micro-batch moves into the pipeline's micro-batches: dropout is seeded before each
micro-batch's forward on every stage (``MicroBatchCounter``), and every rank draws the step's micro-batches from its
reader (only the first and last stage use them), so that the readers of a pipeline stay in step. Where llmtrain
clips (ZeRO-0 in fp32) it clips inside the optimizer's ``step``, which ``train_batch`` calls: a step pre-hook.
"""

from __future__ import annotations

import math

import torch

from llmtrain.data.reader import ValidationWindows
from llmtrain.distributed.deepspeed import clip_whole_gradients, initialize
from llmtrain.distributed.pipeline import IGNORE, MicroBatchCounter, build_pipeline, model_name
from llmtrain.errors import AgreedError
from llmtrain.model import build_model
from llmtrain.optim import build_optimizer, lr_at, set_lr
from llmtrain.run import setup
from llmtrain.train.trainer import StepOutcome, Trainer


class PipelineTrainer(Trainer):
    def _build_engine(self, started: setup.RunSetup):
        """The pipeline module of this rank's stage, with the weights the 1-process model starts from (the whole
        model built with the same seed, or model.init_from's weights, copied in by name), the optimizer (llmtrain's
        clipping inside its step where the trainer clips) and the pipeline engine on DeepSpeed's grid."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        cfg, topology = self.cfg, self.topology
        grid = PipeModelDataParallelTopology(num_pp=topology.pp, num_mp=topology.inner, num_dp=topology.dp)
        dualpipev = cfg.dist.pipeline_schedule == "dualpipev"
        if dualpipev and self.grad_accum < 2 * topology.pp:
            raise AgreedError(f"dist.pipeline_schedule=dualpipev needs at least {2 * topology.pp} micro-batches per "
                              f"step (2 x dist.pipeline_parallel); train.global_batch_size="
                              f"{cfg.train.global_batch_size} gives {self.grad_accum} (train.micro_batch_size="
                              f"{cfg.train.micro_batch_size} x {topology.dp} data-parallel rank(s) x accumulation)")
        module = build_pipeline(self.model_cfg, cfg.dist.pipeline_partition, cfg.dist.activation_checkpointing, grid,
                                dualpipev)
        if started.initial is not None:
            source = started.initial.state_dict
        else:
            torch.manual_seed(cfg.train.seed)
            source = build_model(self.model_cfg).state_dict()
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(source[model_name(name, self.model_cfg.n_layer)])
        del source
        self.counter = MicroBatchCounter(self._seed_dropout)
        module.register_forward_pre_hook(self.counter)
        optimizer = build_optimizer(cfg.optim, module.parameters(), cfg.dist.offload_optimizer, self.env.device)
        self._norm: torch.Tensor | None = None
        if self.trainer_clips:
            optimizer.register_step_pre_hook(self._clip_before_update)
        engine = initialize(module, optimizer, self.ds_config)
        if (engine.grid.get_data_parallel_id(), engine.stage_id) != (topology.dp_rank, topology.stage):
            raise RuntimeError(f"DeepSpeed's grid puts rank {topology.rank} at data-parallel rank "
                               f"{engine.grid.get_data_parallel_id()}, stage {engine.stage_id}; llmtrain expected "
                               f"{topology.dp_rank}, {topology.stage}")
        return engine

    def _clip_before_update(self, optimizer, args, kwargs) -> None:
        """Inside ``train_batch``, before the update: llmtrain's norm over the pipeline (tied weights counted once)
        and the clip; a non-finite norm drops the gradients, so that the update skips every parameter."""
        self._norm = clip_whole_gradients(self.engine, self.cfg.optim.grad_clip or math.inf)
        if not math.isfinite(self._norm.item()):
            self._drop_gradients()

    def train_step(self) -> StepOutcome:
        cfg, engine = self.cfg, self.engine
        set_lr(engine.optimizer, lr_at(self.step, cfg.optim, cfg.train.max_steps))
        micro_batches = [self.batches.next() for _ in range(self.grad_accum)]
        self.counter.begin_step()
        self.checkpoints.before_update(self.step + 1)  # train_batch updates: a background save reads first
        self._norm = None
        loss = engine.train_batch(iter(micro_batches))
        outcome = self._exchange(loss.detach().float(), self._norm if self.trainer_clips else None)
        norm_ok = not self.trainer_clips or math.isfinite(outcome.norm)
        outcome.applied = math.isfinite(outcome.loss) and norm_ok and engine.was_step_applied()
        return outcome

    def _score(self, val: ValidationWindows, total: torch.Tensor) -> None:
        """Add this rank's share of ``val`` into ``total`` through ``eval_batch``, as many micro-batches at a time as a
        training step has (DeepSpeed's DualPipeV evaluates only that many per call), of the training micro-batch
        size: the ragged last one, and the micro-batches that fill the last call, padded with rows whose targets are
        ignored (``PipelineLoss`` sums the real targets' losses; they are counted here); as many calls on every rank
        (eval_batch is collective). The loss stage adds them (the last, or DualPipeV's rank 0), the others nothing."""
        bs, chunk = self.cfg.train.micro_batch_size, self.grad_accum
        batches, num_batches, (like_x, like_y) = self._val_batches(val)
        num_batches = math.ceil(num_batches / chunk) * chunk
        padded = []
        for i in range(num_batches):
            x, y = batches[i] if i < len(batches) else (like_x[:0], like_y[:0])
            rows = bs - x.shape[0]
            if rows:
                x = torch.cat([x, like_x[:1].expand(rows, -1)])
                y = torch.cat([y, torch.full((rows, y.shape[1]), IGNORE, dtype=y.dtype)])
            padded.append((x.to(self.engine.device), y.to(self.engine.device)))
        loss_fn = self.engine.module.loss_fn
        loss_fn.summing = True
        try:
            for first in range(0, num_batches, chunk):
                outputs = self.engine.eval_batch(iter(padded[first:first + chunk]), reduce_output=None,
                                                 bcast_loss=False, num_micro_batches=chunk)
                if outputs is not None:
                    total[0] += torch.stack(outputs).double().sum()
        finally:
            loss_fn.summing = False
        if outputs is not None:
            total[1] += sum(int((y != IGNORE).sum()) for _, y in padded)
