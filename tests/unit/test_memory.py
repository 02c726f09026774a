"""The per-rank memory prediction: ZeRO's accounting by stage, and the settings it suggests when a run cannot fit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llmtrain.config import MLP, DistConfig, ModelConfig, Precision, TrainConfig, TrainLoopConfig
from llmtrain.distributed.memory import GB, estimate, only_direct_saves_fit, what_would_fit

PSI = 310_000_000  # 350m at vocabulary 8192


def config(stage: int, precision: Precision = Precision.fp32, micro: int = 1, background: bool | str = False,
           buffer_gb: float | None = None, **dist) -> TrainConfig:
    return TrainConfig(model=ModelConfig(n_layer=24, n_head=16, n_embd=1024, block_size=256, vocab_size=8192),
                       dist=DistConfig(zero_stage=stage, **dist), precision=precision,
                       train=TrainLoopConfig(global_batch_size=8 * micro, micro_batch_size=micro,
                                             checkpoint_async=background, checkpoint_buffer_gb=buffer_gb))


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


@pytest.mark.parametrize(("buffer_gb", "copied"), [
    (0.0, 0), (1.0, 0), (1.5, 4 * PSI), (2.0, 12 * PSI / 2), (3.2, 10 * PSI), (None, 10 * PSI)])
def test_a_bounded_buffer_holds_the_largest_of_rank_0s_files_that_fit(buffer_gb, copied):
    # ZeRO-2 fp32 on 2 ranks: rank 0 writes the module's weights (4Ψ = 1.16 GiB) and its optimizer partition
    # (12Ψ/2 = 1.73 GiB); the largest that fit are copied, the rest written from the live tensors
    got = estimate(config(2, background=True, buffer_gb=buffer_gb), PSI, 2, 0).checkpoint_copy
    assert got == pytest.approx(copied) and got <= (buffer_gb if buffer_gb is not None else math.inf) * GB


def test_auto_saves_synchronously_only_where_nothing_else_fits():
    auto = config(2, background="auto", buffer_gb=None)
    with_copy = estimate(auto, PSI, 2, 0)
    direct = with_copy.total - with_copy.checkpoint_copy
    assert with_copy.checkpoint_copy == pytest.approx(10 * PSI)  # auto counts the copies, as true does
    assert not only_direct_saves_fit(auto, with_copy, visible=with_copy.total)  # the copies fit
    assert only_direct_saves_fit(auto, with_copy, visible=(with_copy.total + direct) / 2)
    assert not only_direct_saves_fit(auto, with_copy, visible=direct * 0.9)  # neither fits: the warning's case
    forced = config(2, background=True, buffer_gb=None)
    assert not only_direct_saves_fit(forced, estimate(forced, PSI, 2, 0), visible=direct)
    # what would fit is weighed as auto would run it: with direct saves, never proposing them
    fits = what_would_fit(auto, PSI, 2, 0, visible=direct * 0.9, on_gpu=False)
    assert fits and not any("checkpoint_async" in option for option in fits)


def test_a_run_that_cannot_fit_is_told_what_would():
    cfg = config(0)
    need = estimate(cfg, PSI, 2, 0.5 * GB).total
    fits = what_would_fit(cfg, PSI, 2, 0.5 * GB, visible=need * 0.8, on_gpu=False)
    assert fits and fits[0].startswith("dist.zero_stage=3 (")
    gpu = what_would_fit(dataclasses.replace(cfg, dist=DistConfig(zero_stage=2)), PSI, 2, 0, need * 0.6, on_gpu=True)
    assert any("dist.offload_optimizer=true" in option for option in gpu)
    # nothing fits alone: the settings together, then more ranks
    assert what_would_fit(config(0, micro=4), PSI, 2, 0.5 * GB, visible=3.2 * GB, on_gpu=False) == [
        "dist.zero_stage=3 dist.activation_checkpointing=true train.micro_batch_size=1 (3.1 GB)"]
    assert what_would_fit(cfg, PSI, 2, 0.5 * GB, visible=1.55 * GB, on_gpu=False) == [
        "dist.zero_stage=3 dist.activation_checkpointing=true on 8 ranks (1.3 GB)"]
    assert what_would_fit(cfg, PSI, 2, 0.5 * GB, visible=0.1 * GB, on_gpu=False) == []


def long_context(stage: int = 3, **dist) -> TrainConfig:
    """A 350m-like model at 16384 positions, micro-batch 1, activation checkpointing: the activations dominate."""
    return TrainConfig(model=ModelConfig(n_layer=24, n_head=16, n_embd=1024, block_size=16384, vocab_size=8192),
                       dist=DistConfig(zero_stage=stage, activation_checkpointing=True, **dist),
                       train=TrainLoopConfig(global_batch_size=8, micro_batch_size=1, checkpoint_async=False))


SPLIT = 24 * 12 * 1024**2  # the attention and MLP matrices of config()'s 24 blocks


def test_tensor_parallel_splits_the_block_matrices_and_zero_splits_over_the_data_parallel_ranks():
    whole = PSI - SPLIT  # embeddings and norms, on every tensor-parallel rank
    assert estimate(config(0, tensor_parallel=2), PSI, 2, 0).model_states == pytest.approx(16 * (whole + SPLIT / 2))
    # 4 ranks = 2 data x 2 tensor parallel: ZeRO-1 splits the optimizer state (fp32 master + moments) over 2
    assert estimate(config(1, tensor_parallel=2), PSI, 4, 0).model_states == pytest.approx(
        (8 + 12 / 2) * (whole + SPLIT / 2))


def test_the_split_matrices_are_the_models_own_with_swiglu_grouped_query_attention_and_biases():
    from llmtrain.distributed.memory import block_matrix_params
    from llmtrain.model import build_model

    cfg = ModelConfig(n_layer=2, n_head=8, n_kv_head=2, n_embd=256, mlp=MLP.swiglu, bias=True, vocab_size=300)
    with torch.device("meta"):
        model = build_model(cfg)
    block = model.blocks[0]
    split = [block.attn.qkv.weight, block.attn.qkv.bias, block.attn.proj.weight, block.mlp.up.weight,
             block.mlp.up.bias, block.mlp.down.weight]  # the row-split matrices' biases stay whole
    assert block_matrix_params(cfg) == sum(p.numel() for p in split) == (8 + 2 * 2) * 32 * 257 + 256 * 256 + (
        2 * 704 * 257) + 704 * 256


def test_tensor_parallel_activations_follow_korthikanti():
    cfg = dataclasses.replace(config(2, tensor_parallel=2), precision=Precision.bf16)
    logits = 3 * 256 * 8192 * 4  # whole on every rank: the LM head is not split
    b_t_h = 256 * 1024
    # per layer 10·bth + 24·bth/2 (+ 5·a·bt²/2 on a GPU, where the scores are kept), 2-byte activations
    assert estimate(cfg, PSI, 2, 0).activations == pytest.approx(24 * 22 * b_t_h + logits)
    assert estimate(cfg, PSI, 2, 0, on_gpu=True).activations == pytest.approx(
        24 * (22 * b_t_h + 5 * 16 / 2 * 256**2) + logits)


def test_sequence_parallel_halves_the_activations_and_zero_splits_over_every_rank():
    one, two = (estimate(long_context(sequence_parallel=sp), PSI, sp, 0) for sp in (1, 2))
    assert two.activations == pytest.approx(one.activations / 2)
    # bf16: the block inputs 24·b·(t/sp)·h·2, one block recomputed 34·b·(t/sp)·h, the logits 3·b·(t/sp)·V·4 (fp32)
    assert two.activations == pytest.approx((24 * 2 + 34) * 8192 * 1024 + 3 * 8192 * 8192 * 4)
    assert estimate(long_context(sequence_parallel=2), PSI, 4, 0).model_states == pytest.approx(16 * PSI / 4)
    # where the scores are kept (a GPU), they are a/sp heads over all t positions: halved too
    gpu = [estimate(long_context(sequence_parallel=sp), PSI, sp, 0, on_gpu=True).activations for sp in (1, 2)]
    assert gpu[0] == pytest.approx(one.activations + 5 * 16 * 16384**2) and gpu[1] == pytest.approx(gpu[0] / 2)


def test_cpu_attention_keeps_scores_only_with_dropout():
    # PyTorch's CPU flash kernel (causal, no dropout) keeps no scores; with dropout the math kernel keeps ~16.5 bytes
    # per score at its peak (measured; see attention_score_bytes)
    cfg = long_context()
    dropped = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1))
    extra = estimate(dropped, PSI, 2, 0).activations - estimate(cfg, PSI, 2, 0).activations
    assert extra == pytest.approx(16.5 * 16 * 16384**2)


def test_sequence_parallel_is_suggested_when_only_it_makes_a_long_context_fit():
    cfg = long_context()  # ZeRO-3 already: no tensor parallel, and the other settings are taken
    one, two = (estimate(long_context(sequence_parallel=sp), PSI, 2, 0.5 * GB).total for sp in (1, 2))
    visible = two * 1.01
    assert one > 1.3 * visible
    assert what_would_fit(cfg, PSI, 2, 0.5 * GB, visible, on_gpu=False) == [
        f"dist.sequence_parallel=2 ({two / GB:.1f} GB)"]
    # one rank takes no degree: on two ranks
    assert what_would_fit(cfg, PSI, 1, 0.5 * GB, visible, on_gpu=False) == [
        f"dist.sequence_parallel=2 on 2 ranks ({two / GB:.1f} GB)"]
    # 6 ranks: 2 (and 3, 6) divide them, but only 2 divides the 16 heads
    on_six = estimate(long_context(sequence_parallel=2), PSI, 6, 0.5 * GB).total
    fits = what_would_fit(cfg, PSI, 6, 0.5 * GB, visible, on_gpu=False)
    assert [f for f in fits if "sequence_parallel" in f] == [f"dist.sequence_parallel=2 ({on_six / GB:.1f} GB)"]
    # a block_size the degree does not divide is never proposed
    odd = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block_size=16383))
    assert not any("sequence_parallel" in f for f in what_would_fit(odd, PSI, 2, 0.5 * GB, visible, on_gpu=False))


def test_tensor_parallel_is_suggested_below_zero_3_where_it_divides_the_heads_and_the_mlp():
    cfg = config(2, micro=4)
    need, split = (estimate(config(2, micro=4, tensor_parallel=tp), PSI, 4, 0).total for tp in (1, 2))
    fits = what_would_fit(cfg, PSI, 4, 0, (need + split) / 2, on_gpu=False)
    assert f"dist.tensor_parallel=2 ({split / GB:.1f} GB)" in fits
    assert not any("tensor_parallel" in f for f in what_would_fit(config(3, micro=4), PSI, 4, 0, split, False))


def write_cgroup(folder, limit: str, usage: int, inactive: int, v1: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(limit + "\n")
    (folder / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"{'total_' if v1 else ''}inactive_file {inactive}\nanon {usage}\n")


def test_a_memory_cgroup_limits_what_a_rank_sees(tmp_path):
    from llmtrain.distributed.memory import cgroup_room

    # cgroup v2: the job's own limit (8 GiB, 3 used of which 1 is inactive page cache) under an unlimited parent
    write_cgroup(tmp_path / "jobs", "max", 5 * GB, 0, v1=False)
    write_cgroup(tmp_path / "jobs" / "job_7", str(8 * GB), 3 * GB, 1 * GB, v1=False)
    assert cgroup_room("0::/jobs/job_7\n", tmp_path) == 6 * GB
    # a tighter parent wins
    write_cgroup(tmp_path / "jobs", str(10 * GB), 7 * GB, 0, v1=False)
    assert cgroup_room("0::/jobs/job_7\n", tmp_path) == 3 * GB
    # cgroup v1: the memory hierarchy, "no limit" written as the largest page-aligned int64
    write_cgroup(tmp_path / "memory" / "slurm" / "job_8", str(4 * GB), GB, 0, v1=True)
    write_cgroup(tmp_path / "memory" / "slurm", "9223372036854771712", GB, 0, v1=True)
    assert cgroup_room("4:memory:/slurm/job_8\n3:cpu:/slurm/job_8\n0::/\n", tmp_path) == 3 * GB
    # no limit anywhere, or no memory controller mounted
    assert cgroup_room("4:memory:/slurm\n", tmp_path) is None
    assert cgroup_room("0::/elsewhere\n", tmp_path / "absent") is None


def test_a_layout_the_config_refuses_is_never_proposed():
    # bf16 at ZeRO-0: tensor parallel is refused there (DeepSpeed's ZeRO-0 bf16 optimizer), so it is not proposed,
    # and proposing the rest does not fail
    cfg = dataclasses.replace(config(0, micro=4), precision=Precision.bf16)
    fits = what_would_fit(cfg, PSI, 2, 0.5 * GB, visible=1 * GB, on_gpu=False)
    assert fits and not any("tensor_parallel" in f for f in fits)


def test_zero3_counts_the_optimizer_steps_copy_of_one_sub_groups_gradients():
    # DeepSpeed flattens a sub-group's gradients (one layer, 12h², or the rank's whole partition where smaller) into
    # an fp32 copy for the optimizer's step
    wide, narrow = estimate(config(3), PSI, 2, 0), estimate(config(2), PSI, 2, 0)
    from llmtrain.distributed.deepspeed import buckets_for_width

    layer, buckets = 12 * 1024**2, buckets_for_width(1024, 3)
    assert buckets["sub_group_size"] == layer
    gathered = (2 * layer + 8192 * 1024) * 4 + (buckets["reduce_bucket_size"] + buckets["stage3_prefetch_bucket_size"]
                                                ) * 4 + 4 * 2**20  # and Adam's 4 MiB chunk
    assert wide.buffers == pytest.approx(gathered + 4 * layer)
    assert narrow.buffers < wide.buffers
