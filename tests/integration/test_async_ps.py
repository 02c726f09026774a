"""The parameter-server mode (mode=async_ps) on CPU over TensorPipe: exactness against sync SGD, asynchrony,
sharding across servers, and that its result is a checkpoint the other commands read."""

from __future__ import annotations

import json

from tests.conftest import run_cli
from tests.integration.conftest import STEPS, losses

SGD = ("precision=fp32", "optim.name=sgd", "optim.lr=3e-2", "train.micro_batch_size=8")


def test_one_server_one_worker_equals_sync_sgd(run):
    sync = losses(run("sync-sgd", 1, *SGD, "dist.zero_stage=0"))
    ps = losses(run("ps-1s1w-sgd", 2, *SGD, "mode=async_ps"))
    assert sorted(ps) == sorted(sync) == list(range(1, STEPS + 1))
    assert max(abs(ps[s] - sync[s]) / sync[s] for s in sync) <= 1e-5, (ps, sync)


def test_two_servers_shard_the_model_without_changing_it(run):
    one = losses(run("ps-1s1w-sgd", 2, *SGD, "mode=async_ps"))
    two = losses(run("ps-2s1w-sgd", 3, *SGD, "mode=async_ps", "ps.num_servers=2"))
    assert max(abs(two[s] - one[s]) / one[s] for s in one) <= 1e-6


def test_two_workers_run_asynchronously_and_learn(run):
    run_dir = run("ps-1s2w", 3, "precision=fp32", "mode=async_ps")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # it learns
    # every push was applied: STEPS steps x 2 workers x 4 sequences x 64 tokens
    assert steps[-1]["tokens_seen"] == STEPS * 8 * 64
    assert max(r["staleness_max"] for r in steps) >= 1  # workers did not wait for each other
    assert all(r["staleness_mean"] >= 0 and r["updates_per_s"] > 0 for r in steps)


def test_result_generates_and_evaluates_like_any_checkpoint(run):
    run_dir = run("ps-1s2w", 3, "precision=fp32", "mode=async_ps")
    proc = run_cli("llmtrain-generate", f"run.dir={run_dir}", "prompt=def ", "max_new_tokens=10", "seed=1")
    assert proc.returncode == 0 and proc.stdout.startswith("def "), proc.stderr[-2000:]
    proc = run_cli("llmtrain-eval", f"run.dir={run_dir}", "max_windows=40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    assert abs(float(proc.stdout.strip().splitlines()[-1].split("|")[-3]) - final) < 1e-4
