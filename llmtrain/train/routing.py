"""A mixture of experts' routing in the synchronous loop: the router losses added to each training micro-batch's
objective, and what the routing did, for the metrics of log steps.

Per micro-batch and rank (the aux loss and the capacity are per micro-batch: each rank routes its own tokens):
objective = cross-entropy + train.router_aux_coef x aux + train.router_z_coef x z, aux and z the means over the
sparse layers. The logged ``loss`` stays the cross-entropy, as a dense model's. On log steps (every rank: one
all-reduce), from the steps since the last one:

- ``moe/<layer>/load/<expert>``: the share of layer's routes each expert received (sums to 1 per layer);
- ``moe/<layer>/imbalance``: the most any expert received over the mean (1 when balanced);
- ``moe/aux_loss``, ``moe/z_loss``: the means over micro-batches, ranks and layers;
- ``moe/dropped``: the share of routes dropped by the capacity (0 dropless).

One warning when an expert has received no routes for train.router_collapse_steps steps (counted in log intervals).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from llmtrain.model.moe import router_stats

log = logging.getLogger("llmtrain")


class NoRouting:
    """A dense model: nothing to add, nothing to log."""

    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def metrics(self, steps: int) -> dict[str, float]:
        return {}


class Routing(NoRouting):
    def __init__(self, model: nn.Module, layers: list[int], n_experts: int, aux_coef: float, z_coef: float,
                 collapse_steps: int, device: torch.device, is_main: bool) -> None:
        self.model, self.layers, self.n_experts = model, layers, n_experts
        self.aux_coef, self.z_coef, self.collapse_steps = aux_coef, z_coef, collapse_steps
        # [micro-batches, aux, z, dropped, counts of layer 0 ..., counts of the last layer], summed since the last log
        self.sums = torch.zeros(4 + len(layers) * n_experts, dtype=torch.float64, device=device)
        self.idle = torch.zeros(len(layers), n_experts, dtype=torch.long)
        """Steps each expert has received no routes, to the last log step."""
        self.warned = not is_main  # rank 0 warns

    @classmethod
    def of(cls, model: nn.Module, model_cfg, train_cfg, device: torch.device, is_main: bool) -> NoRouting:
        if not model_cfg.n_experts:
            return NoRouting()
        return cls(model, model_cfg.sparse_layers, model_cfg.n_experts, train_cfg.router_aux_coef,
                   train_cfg.router_z_coef, train_cfg.router_collapse_steps, device, is_main)

    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        stats = router_stats(self.model)
        aux = torch.stack([s.aux_loss for s in stats]).mean()
        z = torch.stack([s.z_loss for s in stats]).mean()
        counts = torch.cat([s.counts for s in stats]).double()
        dropped = sum(s.dropped for s in stats).double()
        self.sums += torch.cat([torch.stack([torch.ones((), dtype=torch.float64, device=aux.device),
                                             aux.detach().double(), z.detach().double(), dropped]), counts])
        return loss + self.aux_coef * aux + self.z_coef * z

    def metrics(self, steps: int) -> dict[str, float]:
        """The routing since the last call (``steps`` steps ago), the same on every rank (collective)."""
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.sums.zero_()
        micro, aux, z, dropped = sums[:4].tolist()
        counts = sums[4:].view(len(self.layers), self.n_experts).cpu()
        routes = counts.sum(dim=1, keepdim=True)
        share = counts / routes.clamp(min=1)
        row = {"moe/aux_loss": aux / micro, "moe/z_loss": z / micro, "moe/dropped": dropped / routes.sum().item()}
        for layer, shares in zip(self.layers, share, strict=True):
            row.update({f"moe/{layer}/load/{e}": float(v) for e, v in enumerate(shares)})
            row[f"moe/{layer}/imbalance"] = float(shares.max() * self.n_experts)
        self.idle = torch.where(counts == 0, self.idle + steps, 0)
        if not self.warned and bool((self.idle >= self.collapse_steps).any()):
            self.warned = True
            layer, expert = (self.idle >= self.collapse_steps).nonzero()[0].tolist()
            log.warning("router collapse: expert %d of block %d has received no tokens for %d steps (see "
                        "moe/<block>/load/<expert> in the metrics; raise train.router_aux_coef)", expert,
                        self.layers[layer], int(self.idle[layer, expert]))
        return row
