"""Optimizers (AdamW, SGD with momentum), weight-decay groups and the learning-rate schedule: the one factory that
the synchronous engine (DeepSpeed wraps what ``build_optimizer`` returns) and each parameter server use.

The group-order contract: ``param_groups`` always returns exactly two groups, ``[decay, no_decay]``, each in
the order the parameters were given (a model's ``parameters()`` order; a tied weight once). Both groups are
present even when one is empty. DeepSpeed keeps its fp32 master copies per optimizer group in this order, and
``llmtrain.export.consolidate`` maps them back to parameter names by rebuilding these groups from the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from llmtrain.config import Decay, OptimConfig, OptimizerName


def full_ndim(param: torch.Tensor) -> int:
    """Dimensions of the whole parameter: one built partitioned (ZeRO-3's zero.Init) is a flat, empty tensor
    here, its shape kept in ``ds_shape`` -- by its own ``dim()`` every matrix would escape weight decay."""
    return len(getattr(param, "ds_shape", param.shape))


def param_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict]:
    """[decay, no_decay]: decay matrices and embeddings (dim >= 2); never norms or biases (dim < 2). Order as given
    (see the contract above)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if full_ndim(p) >= 2]
    no_decay = [p for p in params if full_ndim(p) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.Tensor], offload: bool,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (a model's ``parameters()``, or a parameter server's shard): DeepSpeed's CPU
    Adam when offloaded, PyTorch's fused (CUDA) or foreach (CPU) AdamW otherwise, or SGD with momentum."""
    groups = param_groups(params, cfg.weight_decay)
    if cfg.name == OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adamw_mode=True)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused,
                             foreach=None if fused else True)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine | linear | constant decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == Decay.constant:
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == Decay.linear:
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
