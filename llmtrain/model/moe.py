"""A mixture of experts for a block's feed-forward: a softmax router computed in fp32 sends each token to its top k of
``n_experts`` experts (feed-forwards of the model's MLP kind), whose outputs it adds weighted by the router; shared
experts see every token. Architecture only: an expert-parallel layout splits the experts over ranks with DeepSpeed's
MoE layer around the same ``Router`` (``llmtrain.distributed.experts``).

Routing, per micro-batch of S tokens (the routing is the same function in both places, ``Router.forward``):

- probabilities p = softmax(x W_r^T) in fp32; each token's top k experts; their weights p_top, scaled to sum to 1
  when ``model.router_renormalize`` (Mixtral, Qwen3-MoE's ``norm_topk_prob``);
- dropless (``model.capacity_factor=0``): every route computed; else each expert takes its first
  C = ceil(k S / E x capacity_factor) routes in token order, the rest dropped (weight 0);
- the load-balancing loss (Switch / GShard, over all k routes): E / k x sum_e f_e P_e, f_e the share of the
  S k routes that chose expert e, P_e the mean probability of e; 1 when balanced;
- the z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.config import ModelConfig


@dataclass
class Routes:
    """One micro-batch's routing of S tokens to their k experts."""

    experts: torch.Tensor
    """(S, k) expert ids."""
    weights: torch.Tensor
    """(S, k) fp32 weights of the routes (0 for a dropped one)."""
    slots: torch.Tensor
    """(S, k) each route's place in its expert's queue (the routes before it to that expert, in token order)."""
    kept: torch.Tensor
    """(S, k) bool: the route is computed (always, dropless)."""
    capacity: int
    """Routes each expert takes (dropless: the most any expert received)."""
    stats: RouterStats


@dataclass
class RouterStats:
    """What one routing reports: the two router losses (with gradients) and, detached, the routes each expert
    received and the routes dropped. Read by the trainer after each forward (``router_stats``)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    counts: torch.Tensor
    """(E,) routes each expert received, before any dropping."""
    dropped: torch.Tensor
    """Routes dropped by the capacity (0 dropless)."""


class Router(nn.Module):
    """x -> each token's k experts and their weights (see the module's docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.k = cfg.n_experts, cfg.experts_per_token
        self.renormalize, self.capacity_factor = cfg.router_renormalize, cfg.capacity_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S, C) tokens -> (S, E) logits, in fp32 whatever the model's precision. (A tensor: ZeRO-3 gathers a
        module's weights for its backward through hooks on the tensors it returns.)"""
        return F.linear(x.float(), self.weight.float())

    def route(self, logits: torch.Tensor) -> Routes:
        """The routes of ``forward``'s logits."""
        S, E, k = logits.shape[0], self.n_experts, self.k
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(k, dim=-1)  # (S, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        chosen = torch.zeros_like(probs, dtype=torch.long).scatter_(1, experts, 1)  # (S, E) one per route
        counts = chosen.sum(dim=0)  # (E,)
        slots = (chosen.cumsum(dim=0) - 1).gather(1, experts)  # (S, k): earlier tokens routed to the same expert
        if self.capacity_factor > 0:
            capacity = math.ceil(k * S / E * self.capacity_factor)
            kept = slots < capacity
            weights = weights * kept
        else:
            capacity = 0  # the most routes any expert received: read by the one who needs it (dispatch sizes)
            kept = torch.ones_like(slots, dtype=torch.bool)
        aux = E / k * (probs.mean(dim=0) * counts.detach().float() / S).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        stats = RouterStats(aux, z, counts.detach(), (~kept).sum().detach())
        return Routes(experts, weights, slots, kept, capacity, stats)


def expert_config(cfg: ModelConfig, width: int) -> ModelConfig:
    """The config whose feed-forward is one expert (or the shared experts together): the model's MLP kind at
    ``width``."""
    return dataclasses.replace(cfg, mlp_hidden=width, n_experts=0)


class MixtureOfExperts(nn.Module):
    """A block's feed-forward as a mixture of ``n_experts`` routed experts (+ shared experts)."""

    reports_routing = True
    """Its ``stats`` are one layer's routing (``router_stats``); so are those of its expert-parallel form."""

    def __init__(self, cfg: ModelConfig, expert: type[nn.Module]) -> None:
        super().__init__()
        self.router = Router(cfg)
        one = expert_config(cfg, cfg.expert_hidden)
        self.experts = nn.ModuleList(expert(one) for _ in range(cfg.n_experts))
        self.shared = (expert(expert_config(cfg, cfg.n_shared_experts * cfg.expert_hidden))
                       if cfg.n_shared_experts else None)
        self.stats: RouterStats | None = None
        """The last forward's routing (``RouterStats``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routes = self.router.route(self.router(flat))
        self.stats = routes.stats
        out = self.routed(flat, routes)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(shape)

    def routed(self, flat: torch.Tensor, routes: Routes) -> torch.Tensor:
        """Sum over each token's kept routes of weight x expert(token), accumulated in fp32: each expert computes its
        tokens at once (sorted by expert; one read back of the sizes), padded with zero rows to ``rows_for`` its
        count, so that the matrix shapes repeat from step to step (a CPU's oneDNN keeps a kernel per shape, and the
        host allocator fragments on ever new sizes: measured on ``small`` in bf16, resident memory grew by 0.6 GB
        over 12 steps with exact sizes)."""
        E, k = len(self.experts), routes.experts.shape[1]
        expert_of = torch.where(routes.kept, routes.experts, E).reshape(-1)  # dropped routes sort last
        order = expert_of.argsort(stable=True)
        sizes = torch.bincount(expert_of, minlength=E + 1).tolist()[:E]
        padded = [rows_for(n) for n in sizes]
        kept = sum(sizes)
        order = order[:kept]
        tokens = order // k
        # where each route's row sits among the padded rows: its expert's first row + its place among them
        expert_sorted = expert_of[order]
        first_real = torch.tensor([0, *sizes], device=flat.device).cumsum(0)[:-1]
        first_padded = torch.tensor([0, *padded], device=flat.device).cumsum(0)[:-1]
        rows = first_padded[expert_sorted] + torch.arange(kept, device=flat.device) - first_real[expert_sorted]
        source = torch.full((sum(padded),), flat.shape[0], dtype=torch.long, device=flat.device)
        source[rows] = tokens
        inputs = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])[source]
        # An expert without tokens still runs (on none): its gradient is zeros, not None, so that the optimizer
        # moves it alike whether its tokens were on another rank (data parallel) or nowhere (Adam skips a None).
        outputs = torch.cat([expert(part) for expert, part in zip(self.experts, inputs.split(padded), strict=True)])
        weighted = outputs[rows].float() * routes.weights.reshape(-1)[order, None]
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        out.index_add_(0, tokens, weighted)
        return out.to(flat.dtype)


def rows_for(n: int) -> int:
    """``n`` rounded up to one of 4-8 sizes per power of two (at most 25% more; multiples of 16)."""
    step = max(16, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


def router_stats(model: nn.Module) -> list[RouterStats]:
    """The routing of each mixture-of-experts layer in ``model``'s last forward, in block order."""
    return [m.stats for m in model.modules() if getattr(m, "reports_routing", False) and m.stats is not None]
