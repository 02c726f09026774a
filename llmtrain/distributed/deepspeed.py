"""DeepSpeed: the config dict, generated from the typed config in one function, and the one initialize call."""

from __future__ import annotations

from typing import Any

import torch

from llmtrain.config import Precision, TrainConfig
from llmtrain.errors import UserError


def grad_accumulation_steps(global_batch: int, micro_batch: int, dp_world: int) -> int:
    """global batch = micro batch x accumulation x data-parallel ranks; refuse what does not divide."""
    per_step = micro_batch * dp_world
    if global_batch % per_step:
        raise UserError(f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                        f"{micro_batch} x {dp_world} data-parallel ranks = {per_step}; choose a multiple of {per_step}")
    return global_batch // per_step


def build_ds_config(cfg: TrainConfig, dp_world: int) -> dict[str, Any]:
    """The whole DeepSpeed config. Nothing else in llmtrain writes DeepSpeed settings."""
    accum = grad_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_world)
    zero: dict[str, Any] = {"stage": cfg.dist.zero_stage}
    if cfg.dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.dist.zero_stage == 3:
        # Gather small models whole; keep the stage-3 parameter prefetch modest on CPU hosts.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # bf16: skip a step whose gradients are not finite (fp32 ZeRO and fp16 do so by default).
        "bf16": {"enabled": cfg.precision == Precision.bf16, "check_grad_overflow": True},
        "fp16": {"enabled": cfg.precision == Precision.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """Wrap model and optimizer in a DeepSpeed engine (the only call of deepspeed.initialize)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
