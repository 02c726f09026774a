"""The per-rank memory prediction: ZeRO's accounting by stage, and the settings it suggests when a run cannot fit."""

from __future__ import annotations

import dataclasses

import pytest

from llmtrain.config import DistConfig, ModelConfig, Precision, TrainConfig, TrainLoopConfig
from llmtrain.distributed.memory import GB, estimate, what_would_fit

PSI = 310_000_000  # 350m at vocabulary 8192


def config(stage: int, precision: Precision = Precision.fp32, micro: int = 1, background: bool = False,
           **dist) -> TrainConfig:
    return TrainConfig(model=ModelConfig(n_layer=24, n_head=16, n_embd=1024, block_size=256, vocab_size=8192),
                       dist=DistConfig(zero_stage=stage, **dist), precision=precision,
                       train=TrainLoopConfig(global_batch_size=8 * micro, micro_batch_size=micro,
                                             checkpoint_async=background))


@pytest.mark.parametrize(("stage", "per_param"), [(0, 16), (1, 8 + 12 / 2), (2, 4 + 16 / 2), (3, 16 / 2)])
def test_model_states_per_rank_follow_the_stage(stage, per_param):
    # fp32: weights 4 + gradients 4 + Adam 8 bytes, and DeepSpeed's fp32 master copy (4) at ZeRO-1/2 (at ZeRO-3 the
    # partition is its own master)
    assert estimate(config(stage), PSI, world=2, process_bytes=0).model_states == pytest.approx(per_param * PSI)


def test_mixed_precision_is_the_papers_16_bytes_and_stages_never_grow():
    assert estimate(config(0, Precision.bf16), PSI, 1, 0).model_states == pytest.approx((2 + 4 + 12) * PSI)
    assert estimate(config(3, Precision.bf16), PSI, 8, 0).model_states == pytest.approx(16 * PSI / 8)
    totals = [estimate(config(stage), PSI, 2, 0.5 * GB).total for stage in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True)


def test_activation_checkpointing_and_the_process_are_counted():
    plain, ckpt = estimate(config(3), PSI, 2, 0), estimate(config(3, activation_checkpointing=True), PSI, 2, 0)
    assert ckpt.activations < plain.activations / 5
    assert estimate(config(3), PSI, 2, 0.7 * GB).total - plain.total == pytest.approx(0.7 * GB)


@pytest.mark.parametrize(("stage", "precision", "per_param"), [
    (0, Precision.fp32, 4 + 8), (2, Precision.fp32, 4 + 12 / 2), (2, Precision.bf16, 2 + 12 / 2),
    (3, Precision.fp32, 12 / 2)])
def test_a_background_save_holds_a_host_copy_of_rank_0s_part_of_a_checkpoint(stage, precision, per_param):
    # rank 0 writes the module's weights below ZeRO-3, and every rank its fp32 master and moments (at ZeRO-0 in fp32
    # the torch optimizer's moments, all of them)
    sync, background = (estimate(config(stage, precision, background=b), PSI, 2, 0) for b in (False, True))
    assert background.checkpoint_copy == pytest.approx(per_param * PSI) and sync.checkpoint_copy == 0
    assert background.total - sync.total == pytest.approx(per_param * PSI)
    assert "checkpoint copy" in background.describe() and "checkpoint copy" not in sync.describe()
    fits = what_would_fit(config(stage, precision, background=True), PSI, 2, 0, sync.total * 1.01, on_gpu=False)
    assert f"train.checkpoint_async=false ({sync.total / GB:.1f} GB)" in fits


def test_a_run_that_cannot_fit_is_told_what_would():
    cfg = config(0)
    need = estimate(cfg, PSI, 2, 0.5 * GB).total
    fits = what_would_fit(cfg, PSI, 2, 0.5 * GB, visible=need * 0.8, on_gpu=False)
    assert fits and fits[0].startswith("dist.zero_stage=3 (")
    gpu = what_would_fit(dataclasses.replace(cfg, dist=DistConfig(zero_stage=2)), PSI, 2, 0, need * 0.6, on_gpu=True)
    assert any("dist.offload_optimizer=true" in option for option in gpu)
    # nothing fits alone: the settings together, then more ranks
    assert what_would_fit(config(0, micro=4), PSI, 2, 0.5 * GB, visible=3.2 * GB, on_gpu=False) == [
        "dist.zero_stage=3 dist.activation_checkpointing=true train.micro_batch_size=1 (3.0 GB)"]
    assert what_would_fit(cfg, PSI, 2, 0.5 * GB, visible=1.55 * GB, on_gpu=False) == [
        "dist.zero_stage=3 dist.activation_checkpointing=true on 8 ranks (1.3 GB)"]
    assert what_would_fit(cfg, PSI, 2, 0.5 * GB, visible=0.1 * GB, on_gpu=False) == []
