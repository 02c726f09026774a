"""The layout world = pp x dp x tp x sp, its refusals (one line each), and the DeepSpeed settings generated for it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from llmtrain.config import (
    MLP,
    Arch,
    DataConfig,
    DistConfig,
    Mode,
    ModelConfig,
    Precision,
    RunConfig,
    TrainConfig,
    parallel_problems,
)
from llmtrain.distributed.deepspeed import build_ds_config, trainer_clips
from llmtrain.distributed.parallel import Topology, sequence_loss_scale, tensor_parallel_section
from llmtrain.errors import AgreedError, UserError
from llmtrain.train.checkpoint import DeepSpeedCheckpointIO, describe_layout


def config(model: ModelConfig | None = None, **dist) -> TrainConfig:
    return TrainConfig(data=DataConfig(dir="data"), run=RunConfig(dir="run"), precision=Precision.fp32,
                       model=model or ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64),
                       dist=DistConfig(**dist))


def test_ranks_are_laid_out_model_parallel_innermost():
    layout = [Topology(rank, 8, tp=2) for rank in range(8)]
    assert [t.dp_rank for t in layout] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [t.dropout_rank for t in layout] == [0, 0, 1, 1, 2, 2, 3, 3]  # a tensor-parallel group masks alike
    assert layout[0].dp == 4
    shards = [Topology(rank, 4, sp=2) for rank in range(4)]
    assert [t.dp_rank for t in shards] == [0, 0, 1, 1]
    assert [t.positions(64) for t in shards] == [(0, 32), (32, 64), (0, 32), (32, 64)]
    assert [t.dropout_rank for t in shards] == [0, 1, 2, 3]
    assert Topology(0, 4, sp=2).describe() == ("4 rank(s) = 2 data x 1 tensor x 2 sequence parallel; "
                                               "sequence-parallel groups [[0, 1], [2, 3]]")
    assert Topology(0, 1).positions(64) == (0, 64)


def test_a_degree_that_does_not_divide_the_job_is_refused():
    with pytest.raises(AgreedError, match=r"dist.tensor_parallel=2 does not divide the 3 rank\(s\)"):
        Topology.of(DistConfig(tensor_parallel=2, zero_stage=1), 0, 3)
    assert Topology.of(DistConfig(sequence_parallel=2), 1, 4).dp == 2


@pytest.mark.parametrize(("model", "dist", "mode", "expected"), [
    (dict(n_head=6, n_embd=96), dict(tensor_parallel=4), Mode.sync,
     "dist.tensor_parallel=4 does not divide model.n_head=6"),
    (dict(n_head=4, n_kv_head=1, n_embd=64), dict(sequence_parallel=2), Mode.sync,
     "dist.sequence_parallel=2 does not divide model.n_kv_head=1"),
    (dict(n_head=4, n_embd=64, block_size=66), dict(sequence_parallel=4), Mode.sync,
     "dist.sequence_parallel=4 does not divide model.block_size=66"),
    (dict(n_head=4, n_embd=64, mlp_hidden=130), dict(tensor_parallel=4), Mode.sync,
     "dist.tensor_parallel=4 does not divide the MLP width 130"),
    (dict(n_head=4, n_embd=64), dict(tensor_parallel=2), Mode.async_ps, "applies to mode=sync"),
])
def test_sizes_a_degree_does_not_divide_are_refused(model, dist, mode, expected):
    fields = dict(n_layer=2, block_size=64) | model
    problems = parallel_problems(ModelConfig(**fields), DistConfig(**dist), mode)
    assert len(problems) == 1 and expected in problems[0]


@pytest.mark.parametrize(("dist", "expected"), [
    (dict(tensor_parallel=2, zero_stage=3), "combines with dist.zero_stage=0|1|2"),
    (dict(tensor_parallel=2, sequence_parallel=2), "do not combine yet"),
    (dict(tensor_parallel=0), "dist.tensor_parallel"),
])
def test_layouts_not_supported_are_refused_in_one_line(dist, expected):
    with pytest.raises(ValueError, match=expected) as caught:
        DistConfig(**dist)
    assert "\n" not in str(caught.value)


def test_tensor_parallel_in_mixed_precision_needs_a_zero_optimizer():
    with pytest.raises(ValueError, match="needs dist.zero_stage=1 or 2"):
        dataclasses.replace(config(tensor_parallel=2), precision=Precision.bf16)
    dataclasses.replace(config(tensor_parallel=2, zero_stage=1), precision=Precision.bf16)
    dataclasses.replace(config(sequence_parallel=2), precision=Precision.bf16)


def test_the_whole_config_refuses_what_its_model_cannot_split():
    with pytest.raises(ValueError, match="does not divide model.n_head=4"):
        config(tensor_parallel=8)
    with pytest.raises(ValueError, match="model.arch=lstm trains data parallel only"):
        config(ModelConfig(arch=Arch.lstm, n_layer=1, n_embd=64, block_size=64), sequence_parallel=2)


def test_partition_config_splits_each_fused_piece_and_keeps_the_head_whole():
    llama = ModelConfig(n_layer=2, n_head=8, n_kv_head=2, n_embd=128, block_size=64, mlp=MLP.swiglu)
    section = tensor_parallel_section(llama, 2)
    assert section["autotp_size"] == 2 and section["vocab_parallel_lm_head"] is False
    qkv, up, rows = section["partition_config"]["layer_specs"]
    assert qkv["shape"] == [[128, 32, 32], -1] and qkv["partition_type"] == "column"
    assert up["shape"] == [2, -1]  # gate and up, each split on its own
    assert rows["partition_type"] == "row" and not any("lm_head" in p or "wte" in p for p in rows["patterns"])
    gpt = tensor_parallel_section(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64), 2)
    assert gpt["partition_config"]["layer_specs"][0]["shape"] == [3, -1]
    assert "shape" not in gpt["partition_config"]["layer_specs"][1]


def test_deepspeed_config_of_a_layout():
    tp = build_ds_config(config(tensor_parallel=2, zero_stage=1), dp_world=2)
    assert tp["tensor_parallel"]["autotp_size"] == 2
    assert "train_batch_size" not in tp and tp["gradient_accumulation_steps"] == 2  # 32 = 8 micro x 2 x 2 dp
    with pytest.raises(AgreedError, match="tensor_parallel.autotp_size \\(set dist.tensor_parallel\\)"):
        build_ds_config(config(tensor_parallel=2, deepspeed_overrides={"tensor_parallel": {"autotp_size": 4}}), 1)
    assert trainer_clips(config(tensor_parallel=2, zero_stage=0))  # with DeepSpeed's model-parallel norm


def test_each_shard_mean_loss_counts_one_over_sp_below_zero_3():
    assert sequence_loss_scale(Topology(0, 2, sp=2), zero_stage=1) == 0.5
    assert sequence_loss_scale(Topology(0, 2, sp=2), zero_stage=3) == 1.0
    assert sequence_loss_scale(Topology(0, 2, tp=2), zero_stage=1) == 1.0


def test_checkpoint_layout_in_the_marker_and_zero_0_tensor_parallel_stays_in_its_layout(tmp_path):
    files = DeepSpeedCheckpointIO(None, Topology(0, 2, tp=2), zero_stage=0)
    assert files.marker_fields() == {"world_size": 2, "zero_stage": 0, "tensor_parallel": 2, "sequence_parallel": 1,
                                     "pipeline_parallel": 1, "expert_parallel": 1}
    files.check(tmp_path, {"zero_stage": 0, "tensor_parallel": 2})
    plain = DeepSpeedCheckpointIO(None, Topology(0, 1), zero_stage=0)
    with pytest.raises(UserError, match="resume with dist.tensor_parallel=2"):
        plain.check(tmp_path, {"zero_stage": 0, "tensor_parallel": 2})
    assert describe_layout({"world_size": 4, "tensor_parallel": 1, "sequence_parallel": 2}) == (
        "4 rank(s), sequence parallel 2")
    experts = DeepSpeedCheckpointIO(None, Topology(0, 4, ep=2), zero_stage=1)
    experts.check(tmp_path, {"zero_stage": 1, "world_size": 4, "expert_parallel": 2})
    for saved in ({"zero_stage": 1, "world_size": 2, "expert_parallel": 2},  # another world size
                  {"zero_stage": 1, "world_size": 4}):  # dense, or experts on every rank
        with pytest.raises(UserError, match="an expert-parallel checkpoint resumes only in its own layout"):
            experts.check(tmp_path, saved)


def test_pipeline_stages_are_outermost_as_in_deepspeeds_grid():
    layout = [Topology(rank, 8, pp=2) for rank in range(8)]  # 2 stages x 4 data-parallel ranks
    assert [t.stage for t in layout] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [t.dp_rank for t in layout] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert layout[0].dp == 4
    assert layout[0].describe() == ("8 rank(s) = 2 pipeline x 4 data parallel; stages [[0, 1, 2, 3], [4, 5, 6, 7]], "
                                    "pipelines [[0, 4], [1, 5], [2, 6], [3, 7]]")
    with pytest.raises(AgreedError, match="dist.pipeline_parallel=4 does not divide the 6 rank"):
        Topology.of(DistConfig(pipeline_parallel=4), 0, 6)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_pipeline_parameter_names_map_to_the_models_and_back(tied, pos):
    from llmtrain.distributed.pipeline import model_name, pipe_name
    from llmtrain.model import build_model

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=300, tie_embeddings=tied, pos=pos,
                      bias=True)
    names = [n for n, _ in build_model(cfg).named_parameters()]
    pipe = [pipe_name(n, cfg.n_layer, tied) for n in names]
    assert [model_name(n, cfg.n_layer) for n in pipe] == names
    assert pipe_name("blocks.2.attn.qkv.bias", 3, tied) == "4.attn.qkv.bias"
    assert pipe_name("wte.weight", 3, tied) == "tied_modules.embed.wte.weight"
    if not tied:
        assert pipe_name("lm_head.weight", 3, tied) == "6.lm_head.weight"


def test_pipeline_refusals_are_one_line_each():
    for dist, expected in [({"pipeline_parallel": 2, "zero_stage": 2}, "combines with dist.zero_stage=0|1"),
                           ({"pipeline_parallel": 2, "tensor_parallel": 2}, "AutoTP cannot split a pipeline"),
                           ({"pipeline_parallel": 2, "sequence_parallel": 2}, "does not combine yet"),
                           ({"pipeline_partition": "best"}, "must be type:<layer class regex>, parameters or uniform"),
                           ({"pipeline_schedule": "gpipe"}, "dist.pipeline_schedule=gpipe must be 1f1b or dualpipev")]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            DistConfig(**dist)
    lstm = ModelConfig(arch=Arch.lstm, n_layer=2, n_embd=64, block_size=64)
    assert "model.arch=lstm trains data parallel only" in parallel_problems(lstm, DistConfig(pipeline_parallel=2))[0]
    assert "mode=sync" in parallel_problems(ModelConfig(), DistConfig(pipeline_parallel=2), Mode.async_ps)[0]
    short = ModelConfig(n_layer=2)
    assert "needs a block on every stage" in parallel_problems(short, DistConfig(pipeline_parallel=4))[0]
    with pytest.raises(ValueError, match="needs dist.zero_stage=1: DeepSpeed's universal conversion"):
        dataclasses.replace(config(pipeline_parallel=2, zero_stage=0), precision=Precision.bf16)
    with pytest.raises(AgreedError, match="llmtrain's own setting"):
        build_ds_config(config(pipeline_parallel=2, deepspeed_overrides={"pipeline": {"partition": "uniform"}}), 1)
    assert build_ds_config(config(pipeline_parallel=2), 1)["pipeline"]["stages"] == 2


def test_zero_0_pipeline_checkpoints_stay_in_their_layout(tmp_path):
    plain = DeepSpeedCheckpointIO(None, Topology(0, 1), zero_stage=0)
    with pytest.raises(UserError, match="resume with dist.pipeline_parallel=2"):
        plain.check(tmp_path, {"zero_stage": 0, "pipeline_parallel": 2})
    DeepSpeedCheckpointIO(None, Topology(0, 1), zero_stage=1).check(tmp_path, {"zero_stage": 1, "pipeline_parallel": 2})


def test_the_memory_prediction_counts_the_largest_stage():
    from llmtrain.distributed.memory import layer_params, stage_params
    from llmtrain.model import build_model

    cfg = ModelConfig(n_layer=4, n_head=2, n_embd=16, block_size=8, vocab_size=300)
    layers = layer_params(cfg)
    assert sum(layers) - layers[-1] == build_model(cfg).num_params(non_embedding=False)  # the tied head again
    block = layers[2]
    first, last = layers[0] + layers[1] + 2 * block, 2 * block + layers[-2] + layers[-1]
    assert stage_params(cfg, 2, "type:Block") == [first, last]
