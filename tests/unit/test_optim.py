"""ChunkedAdamW (llmtrain/train/optim.py): bitwise torch's foreach AdamW, state and state_dict included."""

from __future__ import annotations

import copy

import pytest
import torch

from llmtrain.optim import ChunkedAdamW

SHAPES = [(300, 100), (17,), (500, 70), (1, 5), (3,), (4096,), (64, 64)]


class SmallChunks(ChunkedAdamW):
    CHUNK = 1000  # 30,000- and 35,000-element tensors are split; the small ones batched together


def train(cls: type[torch.optim.Optimizer], steps: int, seed: int = 0, flat: bool = False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(sum(torch.Size(s).numel() for s in SHAPES),)] if flat else SHAPES  # flat: one ZeRO-like partition
    params = [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]
    groups = [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}]
    opt = cls(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("flat", [False, True])
def test_chunked_steps_equal_torch_foreach_adamw_bitwise(flat):
    ref, ref_opt = train(torch.optim.AdamW, 4, flat=flat)
    got, got_opt = train(SmallChunks, 4, flat=flat)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    for a, b in zip(ref, got, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_opt.state[a][key], got_opt.state[b][key]), key
    assert got_opt.state[got[0]]["step"].item() == 4.0  # counted once per step, however many chunks
    assert str(ref_opt.state_dict()) == str(got_opt.state_dict())


def test_its_state_dict_resumes_in_either_optimizer():
    params, opt = train(SmallChunks, 2)
    state = opt.state_dict()
    for cls in (torch.optim.AdamW, SmallChunks):
        copies = [p.detach().clone().requires_grad_() for p in params]
        other = cls([{"params": copies[::2], "weight_decay": 0.1}, {"params": copies[1::2], "weight_decay": 0.0}],
                    lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        other.load_state_dict(copy.deepcopy(state))  # torch loads step counters without copying them
        for p in copies:
            p.grad = torch.ones_like(p)
        other.step()
        assert all(other.state[p]["step"].item() == 3.0 for p in copies)
    assert len(state["state"]) == len(SHAPES)


def test_the_one_gradient_norm_is_float64_accurate_where_fp32_norms_are_not():
    """llmtrain's norm (``grad_norm``) against float64 over a large tensor of heavy-tailed values (as gradients are)
    and small ones; torch's fp32 ``vector_norm`` of the same tensors drifts by more than 1e-6 here."""
    from llmtrain.optim import clip_grads_, grad_norm

    gen = torch.Generator().manual_seed(0)
    big = 3 * (1 << 20) + 5
    grads = [torch.randn(big, generator=gen) * torch.exp(2 * torch.randn(big, generator=gen)),
             torch.randn(64, 64, generator=gen),
             torch.randn(7, generator=gen)]
    exact = float(sum(g.double().pow(2).sum() for g in grads).sqrt())
    ours = grad_norm(grads)
    assert ours.dtype == torch.float64 and abs(float(ours) - exact) / exact < 1e-12
    whole = torch.cat([g.reshape(-1) for g in grads])
    assert abs(float(torch.linalg.vector_norm(whole)) - exact) / exact > 1e-5  # torch's fp32 norm: 2.1e-4 off
    clip_grads_(grads, 0.5, ours)
    assert abs(float(grad_norm(grads)) - 0.5) < 1e-6
    assert float(grad_norm([])) == 0.0
