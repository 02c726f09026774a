"""Training configuration: presets compose through the CLI path, the generated DeepSpeed dict, the LR schedule."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from llmtrain.cli._entry import CONF_DIR, _precheck, to_typed
from llmtrain.config import DataConfig, Decay, OptimConfig, OptimizerName, Precision, TrainConfig, register_configs
from llmtrain.distributed.deepspeed import build_ds_config, grad_accumulation_steps, should_compile
from llmtrain.errors import UserError
from llmtrain.model import GPT, build_model
from llmtrain.optim import build_optimizer, lr_at, param_groups

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


def compose(overrides: list[str]) -> TrainConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_typed(hydra_compose(config_name="train", overrides=["data.dir=d", "run.dir=r", *overrides]),
                        TrainConfig)


def test_presets_listed():
    assert PRESETS == ["1.3b", "350m", "760m", "gpt2-124m", "llama", "lstm", "mini", "small", "tiny"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_builds(preset):
    cfg = compose([f"model={preset}"])
    assert cfg.model.name == preset
    # the architecture is valid: build it on the meta device (no memory) with a GPT-2-sized vocabulary
    with torch.device("meta"):
        model = build_model(type(cfg.model)(**{**vars(cfg.model), "vocab_size": 50257}))
    total = model.num_params(non_embedding=False) / 1e6
    expected = {"tiny": (3, 4), "mini": (15.5, 16.5), "small": (29, 31), "gpt2-124m": (123, 126), "350m": (350, 360),
                "760m": (750, 765), "1.3b": (1300, 1330), "llama": (150, 170), "lstm": (38, 40)}[preset]
    assert expected[0] <= total <= expected[1], total


@pytest.mark.parametrize("model", ["small", "mini", "lstm"])
def test_the_readme_experiments_compose(model):
    # The README's runs: the demo and the two baseline tables, each with the models it is run with.
    for experiment in sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        cfg = compose([f"experiment={experiment}", f"model={model}"])
        assert cfg.model.name == model and cfg.model.block_size == 128, experiment
    cfg = compose(["experiment=small_data", f"model={model}"])
    assert (cfg.train.subset_tokens, cfg.train.max_steps * cfg.train.global_batch_size * 128) == (262144, 8 * 262144)


def test_only_a_named_source_lets_training_prepare_a_missing_data_dir():
    # A typo in data.dir must not train on the default corpus: the source is named on the command line or by an
    # experiment file (which knows its corpus), never taken from the schema's default.
    assert not compose([]).data.prepare_if_missing
    assert compose(["data=stdlib"]).data.prepare_if_missing
    assert compose(["data=text", "data.paths=[a.txt]"]).data.prepare_if_missing
    for experiment in sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        assert compose([f"experiment={experiment}"]).data.prepare_if_missing, experiment
    assert DataConfig(dir="d").fingerprint() == DataConfig(dir="d", prepare_if_missing=True).fingerprint()


def test_the_default_precision_works_in_both_modes():
    assert compose(["mode=async_ps"]).precision == compose(["mode=sync"]).precision == Precision.bf16


def test_public_override_names():
    cfg = compose(["model=tiny", "precision=fp32", "dist.zero_stage=3", "train.max_steps=7"])
    assert (cfg.precision, cfg.dist.zero_stage, cfg.train.max_steps) == (Precision.fp32, 3, 7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "is not a multiple of train.micro_batch_size=4"),
        (["model.n_embd=100", "model.n_head=3"], "model.n_embd=100 must be divisible by model.n_head=3"),
        (["model=gpt5"],
         "Could not find 'model/gpt5'; choose one of: 1.3b, 350m, 760m, gpt2-124m, llama, lstm, mini, small, tiny"),
        (["precision=fp8"], "expected one of [fp32, bf16, fp16]"),
        (["dist.zero_stage=4"], "dist.zero_stage=4 must be 0, 1, 2 or 3"),
        (["dist.offload_optimizer=true"], "dist.offload_optimizer=true needs dist.zero_stage >= 1"),
        (["dist.zero_stage=2", "dist.offload_optimizer=true", "optim.name=sgd"], "works with optim.name=adamw only"),
        (["+train.epochs=3"], "unknown config key(s): train.epochs"),
        (["mode=async_ps", "precision=fp16"], "mode=async_ps runs in fp32 or bf16"),
        (["mode=async_ps", "ps.algorithm=diloco", "ps.inner_steps=16"],
         "train.max_steps=1000 must be a multiple of ps.inner_steps=16"),
        *[([f"ps.{k}"], message) for k, message in [
            ("inner_steps=0", "ps.inner_steps=0 must be >= 1"),
            ("outer_lr=0", "ps.outer_lr=0.0 must be above 0"),
            ("outer_momentum=1", "ps.outer_momentum=1.0 must be in [0, 1)"),
            ("momentum_activation=-1", "ps.momentum_activation=-1.0 must be in [0, 1/ps.nesterov_buffer]"),
            ("push_dtype=fp16", "ps.push_dtype"),
        ]],
        *[(["mode=async_ps", "ps.algorithm=diloco", "ps.inner_steps=16", "train.max_steps=32", "train.eval_every=32",
            "train.checkpoint_every=32", *extra], message) for extra, message in [
            (["ps.push_every=2"], "ps.push_every=2 is Downpour's"),
            (["ps.fetch_every=4"], "ps.fetch_every=4 is Downpour's"),
            (["ps.overlap=true"], "ps.overlap=true is Downpour's"),
            (["ps.max_staleness=2"], "ps.max_staleness=2 bounds asynchrony, and ps.sync_rounds=true has none"),
            (["ps.staleness_lr=true"], "ps.staleness_lr=True bounds asynchrony"),
            (["train.eval_every=20"], "train.eval_every=20 must be a multiple of ps.inner_steps=16"),
            (["train.stop_at_step=8"], "train.stop_at_step=8 must be a multiple of ps.inner_steps=16"),
        ]],
    ],
)
def test_bad_training_config_is_one_line(capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        _precheck("llmtrain-train", "train", TrainConfig, ["data.dir=d", "run.dir=r", *overrides])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("llmtrain-train: error: ")
    assert message in err, err


def test_grad_accumulation_and_indivisible_batch():
    assert grad_accumulation_steps(64, 4, 2) == 8
    with pytest.raises(UserError, match=r"global_batch_size=12 is not divisible by train.micro_batch_size=4 x 2 "
                                        r"data-parallel ranks = 8; choose a multiple of 8"):
        grad_accumulation_steps(12, 4, 2)


def test_generated_deepspeed_config():
    cfg = compose(["dist.zero_stage=3", "dist.offload_optimizer=true", "dist.offload_params=true",
                   "precision=bf16", "train.global_batch_size=32", "train.micro_batch_size=4", "optim.grad_clip=0.5"])
    ds = build_ds_config(cfg, dp_world=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    fp16 = build_ds_config(compose(["precision=fp16"]), dp_world=1)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0 = dynamic
    plain = build_ds_config(compose(["precision=fp32"]), dp_world=1)
    assert plain["zero_optimization"] == {"stage": 0} and not plain["bf16"]["enabled"]
    assert plain["gradient_clipping"] == 0.0  # ZeRO-0 fp32: the trainer clips, in the pass that reports the norm
    assert "compile" not in ds and build_ds_config(cfg, dp_world=2, compile_model=True)["compile"] == \
        {"deepcompile": True}  # ZeRO-3 compiles through DeepCompile


def test_compile_defaults_to_cuda_at_zero_0_to_2_and_zero3_compile_needs_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [should_compile(None, cpu, stage) for stage in range(4)] == [False] * 4
    assert [should_compile(None, cuda, stage) for stage in range(4)] == [True, True, True, False]
    assert should_compile(True, cpu, 2) and not should_compile(False, cuda, 0) and should_compile(True, cuda, 3)
    with pytest.raises(UserError, match="train.compile=true under ZeRO-3 needs DeepSpeed's DeepCompile"):
        should_compile(True, cpu, 3)


def test_deepspeed_buckets_follow_the_model_width_and_overrides_merge_over_them():
    # model=small: n_embd 384, 384² = 147k elements -> the 4M floor instead of DeepSpeed's 5e8 (2 GB in fp32)
    z2 = build_ds_config(compose(["dist.zero_stage=2"]), dp_world=2)["zero_optimization"]
    assert z2 == {"stage": 2, "reduce_bucket_size": 1 << 22, "allgather_bucket_size": 1 << 22}
    z3 = build_ds_config(compose(["dist.zero_stage=3", "model=1.3b"]), dp_world=2)["zero_optimization"]  # h 2048
    assert (z3["reduce_bucket_size"], z3["stage3_prefetch_bucket_size"], z3["stage3_param_persistence_threshold"]) \
        == (2048**2, int(0.9 * 2048**2), 20480)
    layer = 12 * 2048**2  # a 1.3b layer's parameters: at most two gathered, the optimizer stepped one at a time
    assert (z3["stage3_max_live_parameters"], z3["stage3_max_reuse_distance"], z3["sub_group_size"]) \
        == (2 * layer, layer, layer)
    ds = build_ds_config(compose(["dist.zero_stage=2", "+dist.deepspeed_overrides.zero_optimization.overlap_comm=true",
                                  "+dist.deepspeed_overrides.zero_optimization.reduce_bucket_size=1000",
                                  "+dist.deepspeed_overrides.wall_clock_breakdown=true"]), dp_world=2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "allgather_bucket_size": 1 << 22,
                                       "overlap_comm": True}
    assert ds["wall_clock_breakdown"] is True and ds["train_batch_size"] == compose([]).train.global_batch_size


@pytest.mark.parametrize(("override", "message"), [
    ("+dist.deepspeed_overrides.zero_optimisation.stage=1", "unknown DeepSpeed setting(s) zero_optimisation; see"),
    ("+dist.deepspeed_overrides.zero_optimization.stage=1", "zero_optimization.stage (set dist.zero_stage) is "
                                                            "llmtrain's own setting"),
    ("+dist.deepspeed_overrides.train_batch_size=8", "train_batch_size (set train.global_batch_size)"),
])
def test_deepspeed_overrides_refused_in_one_line(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_ds_config(compose([override]), dp_world=1)


def test_a_partitioned_matrix_still_gets_weight_decay():
    matrix, vector = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0))
    matrix.ds_shape, vector.ds_shape = torch.Size([64, 32]), torch.Size([64])  # as zero.Init leaves them
    decay, no_decay = param_groups([matrix, vector, torch.nn.Parameter(torch.ones(3, 3))], weight_decay=0.1)
    assert [len(decay["params"]), len(no_decay["params"])] == [2, 1] and decay["params"][0] is matrix


def test_lr_schedule_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay=Decay.cosine)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, decay=Decay.linear)
    assert lr_at(35, linear, 110) == pytest.approx(0.75)
    constant = OptimConfig(lr=2.0, warmup_steps=0, decay=Decay.constant)
    assert lr_at(0, constant, 10) == lr_at(9, constant, 10) == 2.0
    assert all(math.isfinite(lr_at(s, cfg, 110)) for s in range(200))


def test_weight_decay_groups_and_optimizers():
    model = GPT(compose(["model=tiny"]).model.__class__(n_layer=1, n_head=2, n_embd=16, block_size=8,
                                                           vocab_size=300, bias=True))
    decay, no_decay = param_groups(model.parameters(), 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(non_embedding=False)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    adamw = build_optimizer(OptimConfig(), model.parameters(), offload=False, device=torch.device("cpu"))
    sgd = build_optimizer(OptimConfig(name=OptimizerName.sgd, momentum=0.8), model.parameters(), offload=False,
                          device=torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
