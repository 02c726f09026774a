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
