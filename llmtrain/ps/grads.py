"""A worker's gradient arithmetic, shared by Downpour's local steps and DiLoCo's inner steps."""

from __future__ import annotations

import torch

from llmtrain.optim import clip_grads_, grad_norm


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
    """Scale ``grads`` in place to a total 2-norm of at most ``max_norm`` (the fp32 sums of a bf16 model have no
    parameter of their dtype, hence gradient tensors): llmtrain's one norm (``llmtrain.optim.grad_norm``), the norm
    before clipping."""
    total = grad_norm(grads)
    clip_grads_(grads, max_norm, total)
    return total


def unit_gradient(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], reader, unit: int, per_step: int,
                  micro_batch_size: int, device: torch.device, straggler, into: dict[str, torch.Tensor]) -> list[float]:
    """Forward and backward over the micro-batches of one unit of data (sample positions [unit * per_step,
    (unit + 1) * per_step) of the reader's order), their mean gradient summed into ``into`` in fp32; each
    micro-batch's loss."""
    micro_steps = per_step // micro_batch_size
    losses = []
    for m in range(micro_steps):
        x, y = reader.batch_at(unit * per_step + m * micro_batch_size, micro_batch_size)
        with straggler.micro_batch():
            _, loss = model(x.to(device), y.to(device))
            (loss / micro_steps).backward()
        losses.append(loss.item())
        accumulate_fp32(params, into)
    return losses
