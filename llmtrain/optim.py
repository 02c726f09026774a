"""Optimizers (AdamW, SGD with momentum), weight-decay groups and the learning-rate schedule: the one factory that
the synchronous engine (DeepSpeed wraps what ``build_optimizer`` returns) and each parameter server use; and
DiLoCo's outer optimizers (``build_outer_optimizer``), which parameter servers apply to pseudo-gradients.

The group-order contract: ``param_groups`` always returns exactly two groups, ``[decay, no_decay]``, each in
the order the parameters were given (a model's ``parameters()`` order; a tied weight once). Both groups are
present even when one is empty. DeepSpeed keeps its fp32 master copies per optimizer group in this order, and
``llmtrain.run.trained`` maps them back to parameter names by rebuilding these groups from the model. Under expert
parallel (``expert_groups``), DeepSpeed's split moves each rank's experts out of them into groups of their own,
appended after the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from llmtrain.config import Decay, OptimConfig, OptimizerName, PSConfig
from llmtrain.workarounds import CHUNKED_ADAMW, usable


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
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class ChunkedAdamW(torch.optim.AdamW):
    """PyTorch's foreach AdamW, stepped over views of at most ``CHUNK`` elements at a time.

    The update is bitwise the one ``torch.optim.AdamW(foreach=True)`` makes (the same elementwise ops, on views;
    tests/unit/test_optim.py checks it), and so are its state and ``state_dict``. But torch's foreach step allocates a
    temporary (``sqrt(exp_avg_sq)``) as large as everything it steps at once: the whole group, which under ZeRO 1-3
    is one flat partition of Ψ/N elements -- 0.6 GB per rank for ``350m`` on 2 ranks, at the moment the ranks hold the
    most. Stepped a chunk at a time that temporary is 4 MiB, and the step runs from cache (2.5x faster on a 40M-element
    flat tensor here). Built on torch's private state set-up (``_init_group``) and functional ``adam``: where either
    is gone or takes other parameters (``llmtrain.workarounds.CHUNKED_ADAMW``), torch's own step runs.
    """

    CHUNK = 1 << 20  # elements

    @torch.no_grad()
    def step(self, closure=None):
        if (closure is not None or any(g["amsgrad"] or g["maximize"] or g["capturable"] for g in self.param_groups)
                or not usable(CHUNKED_ADAMW)):
            return super().step(closure)
        from torch.optim.adam import adam  # checked by usable(CHUNKED_ADAMW), as is _init_group

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            has_complex = self._init_group(group=group, params_with_grad=params, grads=grads, exp_avgs=exp_avgs,
                                           exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=[], state_steps=steps)
            pieces = []  # (param, grad, exp_avg, exp_avg_sq, step): whole tensors, or chunk views of large ones
            for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
                if p.numel() <= self.CHUNK or not all(x.is_contiguous() for x in (p, g, m, v)):
                    pieces.append((p, g, m, v, t))
                else:
                    chunks = (x.view(-1).split(self.CHUNK) for x in (p, g, m, v))
                    pieces += [(*views, t) for views in zip(*chunks, strict=True)]
            for batch in _batches(pieces, self.CHUNK):
                p, g, m, v, t = (list(column) for column in zip(*batch, strict=True))
                adam(params=p, grads=g, exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=[],
                     state_steps=[x.clone() for x in t],  # adam() counts the step; each batch counts a copy
                     amsgrad=False, has_complex=has_complex, beta1=group["betas"][0], beta2=group["betas"][1],
                     lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                     foreach=True, capturable=False, differentiable=False, fused=False, grad_scale=None,
                     found_inf=None, decoupled_weight_decay=True)
            for t in steps:
                t += 1
        return None


def _batches(pieces: list[tuple], limit: int) -> Iterable[list[tuple]]:
    """Consecutive runs of ``pieces`` of at most ``limit`` elements together (a larger piece alone)."""
    batch: list[tuple] = []
    size = 0
    for piece in pieces:
        if batch and size + piece[0].numel() > limit:
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += piece[0].numel()
    if batch:
        yield batch


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.Tensor], offload: bool,
                    device: torch.device, expert_groups: bool = False) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (a model's ``parameters()``, or a parameter server's shard): DeepSpeed's CPU
    Adam when offloaded, PyTorch's fused AdamW (CUDA) or its foreach AdamW stepped in chunks (CPU, ``ChunkedAdamW``)
    otherwise, or SGD with momentum. ``expert_groups``: the model has expert-parallel experts, which DeepSpeed
    reduces and partitions over their own groups (``split_params_into_different_moe_groups_for_optimizer``; the
    weight-decay split kept)."""
    groups = param_groups(params, cfg.weight_decay)
    if expert_groups:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    if cfg.name == OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adamw_mode=True)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    return ChunkedAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


NORM_PIECE = 1 << 16
"""Elements per piece of a gradient that ``grad_norm`` converts to float64 at a time (512 KiB)."""


def grad_norm(grads: Iterable[torch.Tensor], group=None) -> torch.Tensor:
    """llmtrain's one gradient norm (float64, on the device, no read back): each tensor's squares summed in float64
    (pieces of ``NORM_PIECE`` elements converted, then BLAS's float64 dot product), summed over ``group`` (the ranks
    that hold different parts of one model copy: pipeline stages, tensor slices) when given. The caller passes each
    weight's gradient once: a tied or replicated copy on one rank of the group only. torch's fp32 norm accumulates a
    tensor in fp32 (on `tiny`'s step-1 gradients on CPU 5.8e-5 relative off; fp32 dot products of 2^20 elements
    summed in float64 were still 3.2e-6 off); this is a float64 norm at about 1.4x the time of torch's fp32 one
    (benchmarks/bench_norm.py)."""
    parts = []
    for g in grads:
        for piece in g.detach().reshape(-1).split(NORM_PIECE):
            piece = piece.double()
            parts.append(torch.dot(piece, piece))
    total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grads_(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale ``grads`` in place by torch's ``clip_grad_norm_`` factor, min(1, max_norm / (norm + 1e-6)), for their
    norm ``norm`` (``grad_norm``); max_norm = inf leaves them as they are."""
    if not grads or math.isinf(max_norm):
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0).float()
    torch._foreach_mul_(grads, coef.to(grads[0].device))


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


class DelayedNesterov(torch.optim.Optimizer):
    """The Delayed Nesterov outer update of asynchronous Local-SGD (Liu et al. 2024, arXiv 2401.09135, Algorithm 3):
    pseudo-gradients g_t arrive one at a time; the momentum m moves once every ``buffer`` (N) of them, on their mean:

        Δ += g_t
        t % N == 0:  m = β m + Δ / N;   θ -= lr ((1 - cN + c) β m + g_t / N);   Δ = 0
        otherwise:                      θ -= lr (c β m + g_t / N)

    With c = 0 a window of N updates moves θ by one Nesterov step on their mean; with N = 1 it is Nesterov SGD
    (``torch.optim.SGD(nesterov=True)``) for any c."""

    def __init__(self, params, lr: float, momentum: float, buffer: int, activation: float) -> None:
        if activation * buffer > 1:
            raise ValueError(f"ps.momentum_activation={activation} must be at most 1/N = 1/{buffer}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "buffer": buffer, "activation": activation})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta, n, c = group["momentum"], group["buffer"], group["activation"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["t"] = 0
                    state["momentum"] = torch.zeros_like(p)
                    state["delta"] = torch.zeros_like(p)
                state["t"] += 1
                state["delta"].add_(p.grad)
                if state["t"] % n == 0:
                    state["momentum"].mul_(beta).add_(state["delta"], alpha=1 / n)
                    share = 1 - c * n + c
                    state["delta"].zero_()
                else:
                    share = c
                update = p.grad.div(n).add_(state["momentum"], alpha=share * beta)
                p.add_(update, alpha=-group["lr"])


def build_outer_optimizer(ps: PSConfig, params: Iterable[torch.Tensor], num_workers: int) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer over a server's shard (no weight decay: that is the inner optimizer's): SGD with
    Nesterov momentum on each round's mean pseudo-gradient (``ps.sync_rounds``), or Delayed Nesterov on each one
    as it arrives."""
    params = list(params)
    if ps.sync_rounds:
        return torch.optim.SGD(params, lr=ps.outer_lr, momentum=ps.outer_momentum,
                               nesterov=ps.outer_momentum > 0)
    return DelayedNesterov(params, ps.outer_lr, ps.outer_momentum, ps.nesterov_buffer or num_workers,
                           ps.momentum_activation)
