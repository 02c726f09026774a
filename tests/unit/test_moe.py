"""The mixture of experts: routing (top-k of an fp32 softmax, renormalised or not, dropless or with a capacity), the
router losses, the layer against a token-by-token sum, the dense model it reduces to, what it counts (active
parameters, FLOPs), the routing metrics and the collapse warning, and the layouts it refuses."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from llmtrain.config import (
    MLP,
    Arch,
    DistConfig,
    Mode,
    ModelConfig,
    Norm,
    Positions,
    TrainLoopConfig,
    parallel_problems,
)
from llmtrain.distributed.parallel import Topology
from llmtrain.errors import AgreedError
from llmtrain.model import build_model
from llmtrain.model.gpt import FeedForward
from llmtrain.model.moe import MixtureOfExperts, Router, RouterStats, router_stats
from llmtrain.train.routing import Routing

LLAMA = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300, norm=Norm.rmsnorm, pos=Positions.rope,
             mlp=MLP.swiglu)


def moe_config(**fields) -> ModelConfig:
    return ModelConfig(**(LLAMA | dict(n_experts=4, experts_per_token=2) | fields))


def test_one_expert_of_one_is_the_dense_model():
    """E = 1, k = 1 with the dense model's weights copied in: the same logits (within 1e-6)."""
    torch.manual_seed(0)
    dense = build_model(ModelConfig(**LLAMA))
    sparse = build_model(moe_config(n_experts=1, experts_per_token=1))
    weights = {name.replace(".mlp.", ".mlp.experts.0."): t for name, t in dense.state_dict().items()}
    weights |= {name: t for name, t in sparse.state_dict().items() if "router" in name}
    sparse.load_state_dict(weights)
    idx = torch.randint(0, 300, (3, 16))
    assert (dense(idx)[0] - sparse(idx)[0]).abs().max() <= 1e-6


def test_the_layer_is_the_sum_over_each_tokens_experts():
    torch.manual_seed(1)
    cfg = moe_config(n_shared_experts=1, moe_hidden=16)
    layer = MixtureOfExperts(cfg, FeedForward)
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    x = torch.randn(2, 5, 32)
    out = layer(x).reshape(-1, 32)
    flat = x.reshape(-1, 32)
    probs = torch.softmax(flat @ layer.router.weight.T, dim=-1)
    for t in range(flat.shape[0]):
        top = probs[t].topk(2)
        weights = top.values / top.values.sum()
        expected = sum(w * layer.experts[e](flat[t:t + 1])[0] for w, e in zip(weights, top.indices, strict=True))
        expected = expected + layer.shared(flat[t:t + 1])[0]
        assert torch.allclose(out[t], expected, atol=1e-6)
    assert layer.shared.down.weight.shape == (32, 16)  # one shared expert of moe_hidden


def test_router_weights_renormalised_or_the_softmax_probabilities():
    torch.manual_seed(2)
    x = torch.randn(64, 32)
    for renormalize in (True, False):
        router = Router(moe_config(router_renormalize=renormalize))
        torch.nn.init.normal_(router.weight, std=0.3)
        routes = router.route(router(x))
        probs = torch.softmax(x @ router.weight.T, dim=-1)
        expected = probs.topk(2).values
        if renormalize:
            expected = expected / expected.sum(-1, keepdim=True)
        assert torch.allclose(routes.weights, expected, atol=1e-7)
        assert int(routes.stats.dropped) == 0 and bool(routes.kept.all())
        assert int(routes.stats.counts.sum()) == 64 * 2


def test_a_capacity_drops_the_routes_past_it_in_token_order():
    torch.manual_seed(3)
    router = Router(moe_config(capacity_factor=0.5))
    torch.nn.init.normal_(router.weight, std=1.0)
    routes = router.route(router(torch.randn(64, 32)))
    capacity = math.ceil(2 * 64 / 4 * 0.5)
    for e in range(4):
        mine = routes.experts == e
        assert int((mine & routes.kept).sum()) == min(capacity, int(mine.sum()))
        # the kept ones are the first in token order
        slots = routes.slots[mine]
        assert bool((slots[routes.kept[mine]] < capacity).all())
    assert int(routes.stats.dropped) == int((~routes.kept).sum()) > 0
    assert bool((routes.weights[~routes.kept] == 0).all())


def test_the_balancing_loss_is_one_when_the_router_is_uniform_and_z_is_its_logsumexp():
    router = Router(moe_config())
    torch.nn.init.zeros_(router.weight)
    routes = router.route(router(torch.randn(10, 32)))
    assert routes.stats.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert routes.stats.z_loss.item() == pytest.approx(math.log(4) ** 2, abs=1e-6)


def test_every_expert_gets_a_gradient_even_without_tokens():
    """An expert no token chose gets a zero gradient, not None: the optimizer moves it alike whether its tokens were
    on another rank or nowhere (as DeepSpeed's expert-parallel layer does)."""
    torch.manual_seed(4)
    model = build_model(moe_config(n_experts=8, experts_per_token=1))
    idx = torch.randint(0, 300, (1, 2))
    model(idx, idx)[1].backward()
    grads = [p.grad for b in model.blocks for e in b.mlp.experts for p in e.parameters()]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) == 0.0 for g in grads)  # 2 tokens, 8 experts: some had none


def test_sparse_blocks_follow_moe_every_and_active_parameters_count_k_experts():
    cfg = moe_config(n_layer=4, moe_every=2, moe_hidden=16)
    assert cfg.sparse_layers == [1, 3]
    model = build_model(cfg)
    assert [isinstance(b.mlp, MixtureOfExperts) for b in model.blocks] == [False, True, False, True]
    per_expert = sum(p.numel() for p in model.blocks[1].mlp.experts[0].parameters())
    assert per_expert == 3 * 32 * 16  # SwiGLU: gate, up, down
    assert model.num_params() - model.active_params() == 2 * (4 - 2) * per_expert
    dense_flops = 6 * model.num_params() + 12 * 4 * 2 * 16 * 16
    assert model.flops_per_token() == dense_flops - 6 * 2 * 2 * per_expert


def test_the_objective_adds_the_router_losses():
    torch.manual_seed(5)
    cfg = moe_config()
    model = build_model(cfg)
    train = TrainLoopConfig(router_aux_coef=0.01, router_z_coef=0.001)
    routing = Routing.of(model, cfg, train, torch.device("cpu"), is_main=True)
    idx = torch.randint(0, 300, (4, 16))
    loss = model(idx, idx)[1]
    stats = router_stats(model)
    expected = (loss + 0.01 * torch.stack([s.aux_loss for s in stats]).mean()
                + 0.001 * torch.stack([s.z_loss for s in stats]).mean())
    assert routing.objective(loss).item() == pytest.approx(expected.item(), rel=1e-6)
    row = routing.metrics(steps=1)
    for layer in (0, 1):
        assert sum(row[f"moe/{layer}/load/{e}"] for e in range(4)) == pytest.approx(1.0)
    assert row["moe/dropped"] == 0.0
    assert row["moe/aux_loss"] == pytest.approx(float(torch.stack([s.aux_loss.detach() for s in stats]).mean()))


class Layer(torch.nn.Module):
    """A layer that reports the routing it is given."""

    reports_routing = True

    def __init__(self) -> None:
        super().__init__()
        self.stats = None


def test_routing_metrics_and_one_collapse_warning(caplog):
    layer = Layer()
    model = torch.nn.Sequential(layer)
    cfg = moe_config(n_layer=1)
    routing = Routing.of(model, cfg, TrainLoopConfig(router_collapse_steps=25), torch.device("cpu"), is_main=True)
    one = torch.ones(())
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        for counts, dropped in (([6, 2, 0, 0], 1), ([4, 3, 1, 0], 0), ([4, 4, 0, 0], 0)):  # 3 logs, 10 steps each
            layer.stats = RouterStats(one, one, torch.tensor(counts), torch.tensor(dropped))
            for _ in range(2):  # two micro-batches a step
                routing.objective(one)
            row = routing.metrics(steps=10)
    assert [row[f"moe/0/load/{e}"] for e in range(4)] == [0.5, 0.5, 0.0, 0.0]
    assert row["moe/0/imbalance"] == 2.0 and row["moe/dropped"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if "router collapse" in r.getMessage()]
    # expert 3: no routes for 30 steps (warned once, at the third log); expert 2 had one in the second interval
    assert len(warnings) == 1 and "expert 3 of block 0" in warnings[0] and "30 steps" in warnings[0], warnings


@pytest.mark.parametrize(("model", "dist", "mode", "expected"), [
    (dict(), dict(expert_parallel=3), Mode.sync, "dist.expert_parallel=3 does not divide model.n_experts=4"),
    (dict(n_experts=0), dict(expert_parallel=2), Mode.sync, "set model.n_experts"),
    (dict(), dict(), Mode.async_ps, "model.n_experts=4 trains with mode=sync"),
    (dict(), dict(pipeline_parallel=2), Mode.sync, "router losses of earlier stages"),
    (dict(), dict(tensor_parallel=2), Mode.sync, "AutoTP would replicate the experts"),
    (dict(), dict(sequence_parallel=2), Mode.sync, "per slice of a sequence"),
])
def test_layouts_a_mixture_of_experts_does_not_take_are_refused_in_one_line(model, dist, mode, expected):
    problems = parallel_problems(moe_config(**model), DistConfig(**dist), mode)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(("dist", "expected"), [
    (dict(expert_parallel=2, zero_stage=3), "DeepSpeed's MoE layer refuses ZeRO-3"),
    (dict(expert_parallel=2, pipeline_parallel=2), "experts split over data-parallel ranks only"),
])
def test_expert_parallel_with_what_deepspeed_refuses_is_one_line(dist, expected):
    with pytest.raises(ValueError, match=expected):
        DistConfig(**dist)


def test_model_settings_that_do_not_make_a_mixture_are_refused():
    with pytest.raises(ValueError, match="model.experts_per_token=5 is more than model.n_experts=4"):
        moe_config(experts_per_token=5)
    with pytest.raises(ValueError, match="model.arch=lstm has none"):
        ModelConfig(arch=Arch.lstm, n_experts=2)


def test_expert_parallel_groups_must_divide_the_data_parallel_ranks():
    with pytest.raises(AgreedError, match=r"dist.expert_parallel=4 does not divide the 2 data-parallel rank\(s\)"):
        Topology.of(DistConfig(expert_parallel=4), 0, 2)
    assert Topology.of(DistConfig(expert_parallel=2), 0, 4).describe() == (
        "4 rank(s) = 4 data parallel, experts split 2 ways; expert-parallel groups [[0, 1], [2, 3]]")


def test_memory_divides_the_experts_states_by_the_expert_parallel_ranks():
    from llmtrain.config import DataConfig, Precision, RunConfig, TrainConfig
    from llmtrain.distributed.memory import estimate, expert_params, what_would_fit

    model = moe_config(n_layer=4, n_embd=256, n_head=4, n_experts=8, moe_hidden=512, vocab_size=1000)
    with torch.device("meta"):
        total = build_model(model).num_params(non_embedding=False)
    experts = expert_params(model)
    assert experts == 4 * 8 * 3 * 256 * 512
    runs = {ep: TrainConfig(data=DataConfig(dir="d"), run=RunConfig(dir="r"), precision=Precision.fp32, model=model,
                            dist=DistConfig(zero_stage=1, expert_parallel=ep)) for ep in (1, 4)}
    one, split = (estimate(runs[ep], total, 4, 0.0, model=model) for ep in (1, 4))
    # ZeRO-1 fp32 on 4 ranks: weights and gradients 4 + 4 bytes of what a rank holds, the optimizer's 12 of its
    # partition -- over 4 ranks for the dense part, over the expert group's 4 / ep for the experts
    dense = total - experts
    assert one.model_states == pytest.approx(8 * total + 12 * total / 4)
    assert split.model_states == pytest.approx(8 * (dense + experts / 4) + 12 * (dense / 4 + experts / 4))
    room = (split.total + one.total) / 2  # fits with the experts split, not without
    assert any(fit.startswith("dist.expert_parallel=") for fit in what_would_fit(runs[1], total, 4, 0.0, room,
                                                                                   False, model))


def test_an_expert_parallel_checkpoints_weights_by_the_models_names(tmp_path, caplog):
    """The module's file (the router under DeepSpeed's MoE layer) and one file per expert by its global id; bf16
    weights are read as they are, with one warning."""
    from llmtrain.distributed.deepspeed import fp32_weights

    moe = "blocks.0.mlp.moe.deepspeed_moe."
    torch.save({"module": {"wte.weight": torch.ones(2, 2, dtype=torch.bfloat16),
                           moe + "gate.router.weight": torch.zeros(4, 2, dtype=torch.bfloat16)}},
               tmp_path / "mp_rank_00_model_states.pt")
    for e in range(4):
        torch.save({f"{moe}experts.deepspeed_experts.{e}.up.weight": torch.full((2, 2), float(e),
                                                                                 dtype=torch.bfloat16)},
                   tmp_path / f"layer_0_expert_{e}_mp_rank_00_model_states.pt")
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        weights = fp32_weights(tmp_path, 1, moe_config())
    assert sorted(weights) == ["blocks.0.mlp.experts.0.up.weight", "blocks.0.mlp.experts.1.up.weight",
                               "blocks.0.mlp.experts.2.up.weight", "blocks.0.mlp.experts.3.up.weight",
                               "blocks.0.mlp.router.weight", "wte.weight"]
    assert all(float(weights[f"blocks.0.mlp.experts.{e}.up.weight"][0, 0]) == e for e in range(4))
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert len([r for r in caplog.records if "trained in bfloat16" in r.getMessage()]) == 1
