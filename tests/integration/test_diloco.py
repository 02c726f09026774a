"""DiLoCo over the parameter servers (ps.algorithm=diloco): exactly the algorithm, against plain training with one
worker and against a simulation written here from torch primitives with two; stop and resume at a round boundary
bit for bit; asynchronous rounds spend the budget exactly."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from llmtrain.config import TrainConfig
from llmtrain.data.reader import PreparedData
from llmtrain.model import build_model
from llmtrain.optim import clip_grads_, grad_norm, lr_at, param_groups
from tests.integration.conftest import STEPS, launch, losses
from tests.integration.test_async_ps import TWO_WORKERS, applied_units

pytestmark = pytest.mark.slow

H = 4
FP32 = ("precision=fp32", "mode=async_ps", "ps.algorithm=diloco", f"ps.inner_steps={H}", "train.eval_every=20")
PLAIN = (*FP32, "ps.outer_lr=1", "ps.outer_momentum=0")  # the outer step then sets the weights a worker reached
OUTER = (*FP32, "ps.outer_lr=0.7", "ps.outer_momentum=0.9")


def weights(run_dir) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(newest / "model.safetensors")


def test_one_worker_is_plain_training_with_the_inner_optimizer(run):
    """H = 4, outer lr 1, no outer momentum: each round's outer step lands on the weights the worker reached, so the
    run is 1-process training with AdamW (ZeRO-0, fp32); one update per round."""
    reference = losses(run("z0-1rank", 1, "precision=fp32", "dist.zero_stage=0"))
    run_dir = run("diloco-1w", 2, *PLAIN)
    diloco = losses(run_dir)
    assert sorted(diloco) == sorted(reference) == list(range(1, STEPS + 1))
    assert max(abs(diloco[s] - reference[s]) / reference[s] for s in reference) <= 1e-6, (diloco, reference)
    rows = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines()]
    assert [r["units"] for r in rows] == [list(range(r * H, (r + 1) * H)) for r in range(STEPS // H)]


def test_stop_and_resume_at_a_round_boundary_is_bitwise(run, prepared_small, tmp_path):
    """One worker, and two in sync rounds (deterministic leases): a run stopped at step 8 (the end of round 2) and
    resumed has the uninterrupted run's losses and final weights bit for bit -- the outer momentum and each worker's
    inner AdamW state went through the checkpoint."""
    for name, ranks, overrides in (("diloco-1w", 2, PLAIN), ("diloco-2w", 3, OUTER)):
        whole = run(name, ranks, *overrides)
        resumed = tmp_path / name
        launch(resumed, prepared_small, ranks, *overrides, "train.stop_at_step=8")
        saved = torch.load(resumed / "checkpoints" / "step_00000008" / "ps0.pt", map_location="cpu",
                           weights_only=False)
        assert sorted(saved["inner"]) == list(range(ranks - 1)), name  # every worker's inner state
        launch(resumed, prepared_small, ranks, *overrides)
        assert losses(resumed) == losses(whole), name
        assert all(torch.equal(weights(resumed)[k], v) for k, v in weights(whole).items()), name
        assert sorted(applied_units(resumed)) == list(range(STEPS * (ranks - 1)))


def simulate(run_dir, data_dir, workers: int) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """DiLoCo with sync rounds, on one process: per round, each worker's AdamW copy takes H steps from the outer
    weights on its slot of units (worker w: r W H + w H + j), the outer Nesterov SGD steps on the mean of the
    pseudo-gradients. The loss of step s: the mean over units (s - 1) W .. s W - 1."""
    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                                           OmegaConf.load(run_dir / "config.yaml")))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    reader = PreparedData(data_dir).train_reader(cfg.model.block_size, cfg.train.seed, 0, 1)
    inner = [copy.deepcopy(model) for _ in range(workers)]
    adams = [torch.optim.AdamW(param_groups(m.parameters(), cfg.optim.weight_decay), lr=cfg.optim.lr,
                               betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, foreach=True)
             for m in inner]
    outer = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    outer_sgd = torch.optim.SGD(outer, lr=cfg.ps.outer_lr, momentum=cfg.ps.outer_momentum, nesterov=True)
    per_step = cfg.train.global_batch_size // workers
    micro = per_step // cfg.train.micro_batch_size
    unit_loss = {}
    for r in range(cfg.train.max_steps // H):
        deltas = []
        for w in range(workers):
            with torch.no_grad():
                for p, o in zip(inner[w].parameters(), outer, strict=True):
                    p.copy_(o)
            for j in range(H):
                unit = r * workers * H + w * H + j
                parts = []
                for m in range(micro):
                    x, y = reader.batch_at(unit * per_step + m * cfg.train.micro_batch_size,
                                           cfg.train.micro_batch_size)
                    loss = inner[w](x, y)[1]
                    (loss / micro).backward()
                    parts.append(loss.item())
                grads = [p.grad for p in inner[w].parameters()]  # clipped by llmtrain's one norm
                clip_grads_(grads, cfg.optim.grad_clip or math.inf, grad_norm(grads))
                for group in adams[w].param_groups:
                    group["lr"] = lr_at(unit // workers, cfg.optim, cfg.train.max_steps)
                adams[w].step()
                adams[w].zero_grad(set_to_none=True)
                unit_loss[unit] = sum(parts) / len(parts)
            deltas.append([o.detach() - p.detach() for p, o in zip(inner[w].parameters(), outer, strict=True)])
        for i, o in enumerate(outer):
            o.grad = torch.stack([d[i] for d in deltas]).mean(0)
        outer_sgd.step()
    step_loss = {s: sum(unit_loss[u] for u in range((s - 1) * workers, s * workers)) / workers
                 for s in range(1, cfg.train.max_steps + 1)}
    names = [n for n, _ in model.named_parameters()]
    return step_loss, {n: o.detach() for n, o in zip(names, outer, strict=True)}


def test_two_workers_in_sync_rounds_are_a_simulation_of_diloco(run, prepared_small):
    run_dir = run("diloco-2w", 3, *OUTER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank under torchrun (OMP_NUM_THREADS=1): the same matmul summation order
    try:
        expected, final = simulate(run_dir, prepared_small, workers=2)
    finally:
        torch.set_num_threads(threads)
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - expected[s]) / expected[s] for s in expected) <= 1e-6, (got, expected)
    trained = weights(run_dir)
    assert max(float((trained[n] - final[n]).abs().max() / final[n].abs().max()) for n in final) <= 1e-6
    rows = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines()]
    assert [(r["worker"], r["units"]) for r in rows[:2]] == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])]


def test_asynchronous_rounds_spend_the_budget_once_and_learn(run):
    """ps.sync_rounds=false: each pseudo-gradient is applied on arrival (Delayed Nesterov); 2 workers computing in
    bf16 (inner steps on fp32 masters) and pushing fp32: every unit once, and 0.75 / H of fp32 Downpour's bytes per
    token (per round a bf16 pull and an fp32 push, where Downpour pulls and pushes fp32 every local step)."""
    run_dir = run("diloco-2w-async", 3, *OUTER, "precision=bf16", "ps.sync_rounds=false", "ps.push_dtype=fp32")
    assert sorted(applied_units(run_dir)) == list(range(STEPS * 2))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) and steps[-1]["loss"] < steps[0]["loss"] - 0.5
    downpour = [json.loads(x) for x in (run(*TWO_WORKERS) / "metrics.jsonl").read_text().splitlines()]
    # the least per row: rows of rounds whose push also carried the inner state (for a checkpoint) move more
    per_token = [min(r["bytes_per_token"] for r in rs if "bytes_per_token" in r) for rs in (steps, downpour)]
    assert per_token[0] == pytest.approx(per_token[1] * 0.75 / H, rel=1e-6), per_token


def test_a_worker_lost_mid_round_costs_the_round_only_its_pseudo_gradient(prepared_small, tmp_path):
    """Sync rounds over gRPC, each rank its own process: the slow worker is SIGKILLed inside a round and a new worker
    joins. The round closes with the pseudo-gradient that arrived (after ps.timeout_s), the lost units are leased
    again in the next round, the joiner takes part from the round after it asked, and every unit of the budget is
    applied once."""
    import signal

    from tests.integration.test_async_ps import start_joining_worker, start_processes, wait_for_step

    run_dir = tmp_path / "run"
    job = ("ps.transport=grpc", "ps.algorithm=diloco", "ps.inner_steps=5", "train.max_steps=60",
           "train.eval_every=60", "train.log_every=5", "train.slow_rank_factor=4")  # worker 1, the last, is slow
    server, fast, victim = start_processes(run_dir, prepared_small, 3, *job)
    wait_for_step(run_dir, 10)
    victim.send_signal(signal.SIGKILL)
    joiner = start_joining_worker(run_dir, prepared_small, *job)
    out, err = server.communicate(timeout=300)
    assert server.returncode == 0, err[-3000:]
    assert fast.wait(timeout=60) == 0 and joiner.wait(timeout=60) == 0, joiner.stderr.read()[-2000:]
    assert "worker 1 was lost mid-round" in err and "worker 2 joined the job" in err and "step 60: val_loss" in out
    rows = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines()]
    print("\n".join(json.dumps(r) for r in rows))  # the transcript (pytest -s)
    assert {r["worker"] for r in rows} == {0, 1, 2}
    assert sorted(applied_units(run_dir)) == list(range(60 * 2))
