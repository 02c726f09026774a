"""Training on a weighted mix of two prepared folders: per-source metrics, the weighted validation loss, and a
run stopped on 2 ranks that continues on 1 exactly as the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import STEPS, launch, losses

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did


def mix_args(first, second) -> list[str]:
    return ["data.dir=", f"data.mix=[{{dir: {first}, weight: 3}}, {{dir: {second}, weight: 1, name: code}}]",
            "precision=fp32", "dist.zero_stage=2"]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_run(prepared_small, prepared_second, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mix") / "uninterrupted"
    launch(run_dir, prepared_small, 2, *mix_args(prepared_small, prepared_second))
    return run_dir


def test_metrics_per_source_and_the_weighted_validation_loss(mixed_run):
    logged = rows(mixed_run)
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == STEPS and steps[-1]["loss"] < steps[0]["loss"] - 0.5
    for r in steps:
        assert r["tokens_seen/small"] + r["tokens_seen/code"] == r["tokens_seen"]
    share = steps[-1]["tokens_seen/small"] / steps[-1]["tokens_seen"]
    assert abs(share - 0.75) < 0.1  # 160 samples: close to the weight; exact shares are the unit test's
    evals = [r for r in logged if "val_loss" in r]
    assert len(evals) == 2
    for r in evals:
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/small"] + 0.25 * r["val_loss/code"], rel=1e-12)
        assert r["val_loss/small"] != r["val_loss/code"]


def test_stopped_on_two_ranks_then_resumed_on_one_equals_the_uninterrupted_run(mixed_run, prepared_small,
                                                                               prepared_second, tmp_path):
    run_dir = tmp_path / "two-then-one"
    args = mix_args(prepared_small, prepared_second)
    launch(run_dir, prepared_small, 2, *args, "train.stop_at_step=10")
    second = launch(run_dir, prepared_small, 1, *args)
    assert "saved on 2 ranks" in second.stderr
    reference, got = losses(mixed_run), losses(run_dir)
    assert max(abs(got[s] - reference[s]) / reference[s] for s in range(11, STEPS + 1)) <= 1e-4
    last = [r for r in rows(run_dir) if "loss" in r][-1]
    assert last["tokens_seen/code"] == [r for r in rows(mixed_run) if "loss" in r][-1]["tokens_seen/code"]


def test_a_mix_with_another_tokenizer_is_one_line(prepared_small, tmp_path):
    from llmtrain.data.prepare import prepare
    from tests.conftest import small_data_config

    other = tmp_path / "other"
    prepare(small_data_config(other, max_documents=30, vocab_size=512))
    proc = launch(tmp_path / "bad", prepared_small, 1, "data.dir=",
                  f"data.mix=[{{dir: {prepared_small}}}, {{dir: {other}}}]", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llmtrain-train: error: ") and "another tokenizer" in last, proc.stderr[-2000:]
    assert not (tmp_path / "bad").exists()
