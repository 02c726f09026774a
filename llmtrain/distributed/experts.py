"""Expert parallel (``dist.expert_parallel=N``): each mixture-of-experts layer's experts split over N data-parallel
ranks through the classic DeepSpeed MoE layer (``deepspeed.moe.layer.MoE``: its all-to-all exchange, its expert
groups for gradients, ZeRO and checkpoints), routed by the model's own ``Router``.

Every rank stays data parallel and reads its own data. DeepSpeed's expert-parallel groups are N consecutive ranks
(``groups._create_expert_and_data_parallel``); rank r holds experts [e_r L, (e_r + 1) L), L = n_experts / N, e_r its
place in its group, and each expert is replicated over the dp / N ranks of its expert-data-parallel group.

``RouterGate`` is the gate DeepSpeed's ``MOELayer`` calls: the model's routing (``Router.forward``: fp32 softmax,
top-k, renormalisation, capacity) handed over as DeepSpeed's sparse routes (expert, slot, weight per route). Dropless,
every rank's buffers take the most routes any expert received on any rank of its expert group (one all-reduce, as
DeepSpeed's own gate does). The model's numbers are unchanged: the same weights, routes and sums, computed where the
experts are (tests/integration/test_parallel.py checks it against one process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llmtrain.model.moe import MixtureOfExperts, RouterStats, Routes, rows_for

EXPERT_PREFIX = ".deepspeed_moe.experts.deepspeed_experts."
"""How DeepSpeed names an expert's parameters inside its MoE layer (``{layer}.moe`` + this + ``{expert}.``)."""


class RouterGate(nn.Module):
    """The model's ``Router`` as the gate of DeepSpeed's ``MOELayer``."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.ep_group = None
        self.stats: RouterStats | None = None

    def _set_ep_group(self, group) -> None:
        self.ep_group = group

    def forward(self, x: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if used_token is not None or not sparse_routes or use_tutel:
            raise ValueError("llmtrain's router gate gives sparse routes for all tokens (no used_token, no tutel)")
        routes: Routes = self.router.route(self.router(x))
        self.stats = routes.stats
        capacity = routes.capacity
        if capacity == 0:  # dropless: the most any expert received, over the expert group (equal buffers), rounded
            # up as the model rounds its experts' rows (``rows_for``: shapes that repeat from step to step)
            most = routes.stats.counts.max().reshape(1)
            if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
                dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.ep_group)
            capacity = rows_for(int(most.item()))
        indices = torch.where(routes.kept, routes.experts, -1)
        return (routes.stats.aux_loss, capacity, self.router.n_experts, indices.t().contiguous().int(),
                (routes.slots * routes.kept).t().contiguous().int(), routes.weights.t().contiguous(),
                routes.stats.counts)


class ExpertParallelMoE(nn.Module):
    """A ``MixtureOfExperts`` whose routed experts are DeepSpeed's MoE layer over the expert-parallel group: this
    rank's experts, the model's router as its gate; the shared experts stay whole on every rank."""

    reports_routing = True

    def __init__(self, moe: MixtureOfExperts, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups

        n_experts, k = len(moe.experts), moe.router.k
        if f"ep_size_{ep_size}" not in groups._get_expert_parallel_group_dict():  # DeepSpeed's groups, made quietly
            groups._create_expert_and_data_parallel(ep_size)
        self.moe = MoE(hidden_size=moe.router.weight.shape[1], expert=moe.experts[0], num_experts=n_experts,
                       ep_size=ep_size, k=k, drop_tokens=moe.router.capacity_factor > 0, use_rts=False,
                       top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()
        self.moe.deepspeed_moe.gate = RouterGate(moe.router)  # the router's weight: moe.deepspeed_moe.gate.router
        self.moe.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.moe.expert_group_name))
        first = groups._get_expert_parallel_rank(self.moe.expert_group_name) * self.moe.num_local_experts
        with torch.no_grad():
            for j, local in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                for mine, theirs in zip(local.parameters(), moe.experts[first + j].parameters(), strict=True):
                    mine.copy_(theirs)
        self.shared = moe.shared

    @property
    def stats(self) -> RouterStats | None:
        return self.moe.deepspeed_moe.gate.stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)[0]
        if self.shared is not None:
            out = out + self.shared(x)
        return out


def apply_expert_parallel(model: nn.Module, ep_size: int) -> None:
    """Replace every ``MixtureOfExperts`` of ``model`` by its expert-parallel form (after its initial weights are
    set: each rank keeps its own experts' copies)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MixtureOfExperts):
                setattr(module, name, ExpertParallelMoE(child, ep_size))


def model_name(name: str) -> str:
    """The model's name of a parameter in an expert-parallel checkpoint: ``blocks.1.mlp.moe.deepspeed_moe.gate.router.
    weight`` -> ``blocks.1.mlp.router.weight``; ``blocks.1.mlp.moe`` + EXPERT_PREFIX + ``e.up.weight`` (DeepSpeed's
    expert files name each expert by its global id e) -> ``blocks.1.mlp.experts.e.up.weight``."""
    name = name.replace(".moe.deepspeed_moe.gate.router.", ".router.")
    if EXPERT_PREFIX in name:
        head, tail = name.split(".moe" + EXPERT_PREFIX)
        j, rest = tail.split(".", 1)
        return f"{head}.experts.{j}.{rest}"
    return name
