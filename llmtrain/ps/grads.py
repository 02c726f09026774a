"""A worker's gradient arithmetic, shared by Downpour's local steps and DiLoCo's inner steps."""

from __future__ import annotations

import torch


def accumulate_fp32(params: dict[str, torch.nn.Parameter], into: dict[str, torch.Tensor]) -> None:
    """Add this micro-batch's gradients into fp32 sums and clear them: micro-batches of a bf16 model accumulate
    in fp32, as DeepSpeed's bf16 optimizer does (for an fp32 model the sums are what autograd would add up)."""
    for name, param in params.items():
        if param.grad is None:
            into.setdefault(name, torch.zeros_like(param, dtype=torch.float32))
        elif name in into:
            into[name].add_(param.grad)
        else:
            into[name] = param.grad.float()
        param.grad = None


def clip_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place to a total 2-norm of at most ``max_norm`` (``clip_grad_norm_``'s arithmetic, on
    gradient tensors rather than parameters: the fp32 sums of a bf16 model have no parameter of their dtype); the
    norm before clipping."""
    total = torch.nn.utils.get_total_norm(grads)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total
