"""Every config field has its range: out of it (NaN and infinities included) the command refuses in one line, exit 2.

Also: data.mix stands in for data.dir, an override Hydra cannot parse says how to quote it, only the main process of
a launch prints the error line, and a ``UserError`` ends with its own exit code.
"""

from __future__ import annotations

import math
import re

import pytest

from llmtrain.cli._entry import CONF_DIR, _precheck, fail, quoting_hint, run_task, to_typed
from llmtrain.config import (
    MAX_SEED,
    CompareSection,
    DataConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ModelConfig,
    NgramConfig,
    PrepareConfig,
    PSConfig,
    RunConfig,
    TrainConfig,
    TrainedRef,
    bounded,
    register_configs,
)
from llmtrain.errors import AgreedError, RunDiverged, UserError


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def refusal(capsys, config_name: str, schema: type, argv: list[str], command: str = "llmtrain-train") -> str:
    """The one error line ``_precheck`` prints for ``argv`` (exit 2), without its prefix."""
    register_configs()
    with pytest.raises(SystemExit) as exit_info:
        _precheck(command, config_name, schema, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{command}: error: "), err
    return err.removeprefix(f"{command}: error: ").strip()


TRAIN = ["data.dir=d", "run.dir=r"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lr=nan"], "optim.lr=nan must be > 0 and finite"),
    (["optim.lr=inf"], "optim.lr=inf must be > 0 and finite"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0 and finite"),
    (["optim.beta1=1.5", "optim.beta2=-1"], "optim.beta1=1.5 must be in [0, 1); optim.beta2=-1.0 must be in [0, 1)"),
    (["optim.eps=-1"], "optim.eps=-1.0 must be > 0 and finite"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0 and finite"),
    (["optim.momentum=1"], "optim.momentum=1.0 must be in [0, 1)"),
    (["optim.grad_clip=inf"], "optim.grad_clip=inf must be >= 0 and finite"),
    (["optim.min_lr_ratio=nan"], "optim.min_lr_ratio=nan must be in [0, 1]"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be >= 0"),
    (["model.n_kv_head=-2"], "model.n_kv_head=-2 must be >= 0"),
    (["model.mlp_hidden=-5"], "model.mlp_hidden=-5 must be >= 0"),
    (["model.init_std=-1"], "model.init_std=-1.0 must be > 0 and finite"),
    (["model.norm_eps=-1"], "model.norm_eps=-1.0 must be > 0 and finite"),
    (["model.rope_theta=0"], "model.rope_theta=0.0 must be > 0 and finite"),
    (["model.dropout=nan"], "model.dropout=nan must be in [0, 1)"),
    (["model.dropout=1"], "model.dropout=1.0 must be in [0, 1)"),
    (["model.n_layer=1000000000"], "model.n_layer=1000000000 must be <= 1024"),
    (["model.n_embd=1099511627776"], "model.n_embd=1099511627776 must be <= 65536"),
    (["model.block_size=0"], "model.block_size=0 must be >= 1"),
    (["model.vocab_size=-1"], "model.vocab_size=-1 must be >= 0"),
    (["model.n_head=0", "model.n_embd=0"], "model.n_head=0 must be >= 1; model.n_embd=0 must be >= 1"),
    (["dist.timeout_s=0"], "dist.timeout_s=0 must be >= 1"),
    (["dist.timeout_s=100000000000"], "dist.timeout_s=100000000000 must be <= 1000000"),
    (["ps.timeout_s=0", "ps.max_staleness=-1"], "ps.max_staleness=-1 must be >= 0; ps.timeout_s=0 must be >= 1"),
    (["ps.num_servers=0"], "ps.num_servers=0 must be >= 1"),
    (["run.dir="], "run.dir is empty: give the run folder, run.dir=runs/<name>"),
    (["run.dir='  '"], "run.dir is empty: give the run folder, run.dir=runs/<name>"),
    (["data.dir=''"], "data.dir is empty: give a prepared folder, data.dir=<folder>, or data.mix"),
    (["train.subset_tokens=10", "model.block_size=64"],
     "train.subset_tokens=10 is less than one window of model.block_size+1 = 65 tokens (0 = the whole split)"),
    (["train.seed=-1"], "train.seed=-1 must be >= 0"),
    (["train.seed=18446744073709551616"], "train.seed=18446744073709551616 must be <= 2**63 - 1"),
    (["train.max_steps=0", "train.eval_windows=-1"], "train.max_steps=0 must be >= 1; train.eval_windows=-1 must be"),
    (["train.global_batch_size=16777217"], "train.global_batch_size=16777217 must be <= 16777216"),
    (["train.micro_batch_size=100000", "train.global_batch_size=100000"],
     "train.micro_batch_size=100000 must be <= 65536"),
    (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps=0 must be >= 1"),
    (["data.seed=-5"], "data.seed=-5 must be >= 0"),
    (["data.num_proc=100000"], "data.num_proc=100000 must be <= 1024"),
    (["data.val_fraction=nan"], "data.val_fraction=nan must be in (0, 1)"),
    (["data.text_field=''"], "data.text_field is empty"),
    (["data.num_tasks=0"], "data.num_tasks=0 must be >= 1"),
    (["data.mix=[{dir: a, weight: nan}]", "data.dir=''"], "data.mix[0].weight=nan must be > 0 and finite"),
])
def test_out_of_range_training_values_are_one_line(capsys, overrides, message):
    assert message in refusal(capsys, "train", TrainConfig, [*TRAIN, *overrides])


@pytest.mark.parametrize("overrides", [
    ["optim.lr=1e300", "optim.beta1=0", "optim.beta2=0.999999", "optim.weight_decay=0", "optim.grad_clip=0"],
    ["model.n_kv_head=0", "model.mlp_hidden=0", "model.dropout=0.999", "train.subset_tokens=257"],
    ["train.seed=0", f"train.seed={MAX_SEED}", "train.max_steps=9223372036854775807", "dist.timeout_s=1"],
    ["model.block_size=64", "train.subset_tokens=65", "train.eval_windows=0", "ps.max_staleness=0"],
])
def test_values_at_the_edges_of_their_ranges_are_accepted(capsys, overrides):
    register_configs()
    _precheck("llmtrain-train", "train", TrainConfig, [*TRAIN, *overrides])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("value", "low", "high", "kw", "ok"), [
    (math.nan, 0.0, None, {}, False), (math.nan, 0.0, 1.0, {"high_open": True}, False),
    (math.nan, None, 1.0, {}, False), (math.inf, 0.0, None, {}, False), (-math.inf, None, 0.0, {}, False),
    (0.0, 0.0, None, {"low_open": True}, False), (0.0, 0.0, None, {}, True), (1.0, 0.0, 1.0, {}, True),
    (1.0, 0.0, 1.0, {"high_open": True}, False), (2**63, 0, 2**63 - 1, {}, False), (5, 1, None, {}, True),
])
def test_bounded_refuses_nan_and_infinities_everywhere(value, low, high, kw, ok):
    assert (bounded("x", value, low, high, **kw) == []) is ok


def test_data_mix_needs_no_data_dir_for_training_but_prepare_and_ngram_do(capsys):
    cfg = to_typed(compose("train", ["run.dir=r", "data.mix=[{dir: a}, {dir: b}]"]), TrainConfig)
    assert cfg.data.dir == "" and [s.dir for s in cfg.data.mix] == ["a", "b"]
    assert refusal(capsys, "train", TrainConfig, ["run.dir=r"]) == \
        "missing required value(s): data.dir (add data.dir=... or data.mix=[...])"
    assert refusal(capsys, "train", TrainConfig, ["run.dir=r", "data.dir=d", "data.mix=[{dir: a}]"]) == \
        "invalid data config: data.dir=d and data.mix are both set: train on a mix with data.dir=''"
    assert refusal(capsys, "prepare", PrepareConfig, [], "llmtrain-prepare") == \
        "missing required value(s): data.dir (add data.dir=...)"
    assert "prepare each source on its own" in refusal(capsys, "prepare", PrepareConfig, ["data.mix=[{dir: a}]",
                                                                                        "data.dir=''"])
    assert refusal(capsys, "ngram", NgramConfig, ["data.mix=[{dir: a}]"], "llmtrain-ngram") == \
        "missing required value(s): data.dir (add data.dir=...)"
    with pytest.raises(ValueError, match=r"data.dir is empty: give the folder to prepare"):
        PrepareConfig(data=DataConfig(dir=" "))
    with pytest.raises(ValueError, match=r"data.dir is empty: give a prepared folder"):
        NgramConfig(data=DataConfig(dir=""))


@pytest.mark.parametrize(("override", "hint"), [
    ("run.dir=runs/é", """'run.dir="runs/é"'"""),
    ("data.dir=données", """'data.dir="données"'"""),
    ("run.dir=runs/日本", """'run.dir="runs/日本"'"""),
    ("run.dir=a;b", """'run.dir="a;b"'"""),
])
def test_an_unparsable_value_says_how_to_quote_it(capsys, override, hint):
    line = refusal(capsys, "train", TrainConfig, ["data.dir=d", "run.dir=r", override])
    assert line == f"cannot parse {override}: quote a value with non-ASCII or special characters: {hint}"
    quoted = hint[1:-1]  # what the shell hands over
    key, _, value = override.partition("=")
    cfg = to_typed(compose("train", ["data.dir=d", "run.dir=r", quoted]), TrainConfig)
    assert (cfg.data if key == "data.dir" else cfg.run).dir == value


def test_no_quoting_hint_where_quoting_would_not_help():
    assert quoting_hint(["run.dir=fine", "data.paths=[é]"]) == ""  # a list: its items need the quotes
    assert quoting_hint(["run.dir=fine"]) == ""


@pytest.mark.parametrize(("env", "main"), [
    ({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4",
      "SLURM_STEP_NODELIST": "n1"}, False),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4",
      "SLURM_STEP_NODELIST": "n1"}, True),
])
def test_the_main_process_says_it_first(monkeypatch, capsys, env, main):
    """The main process prints at once; another waits first (the launcher stops it there when the main one refused
    alike), and still says a refusal of its own."""
    import signal

    import llmtrain.cli._entry as entry

    for name in ("RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    waited = []
    monkeypatch.setattr(entry, "linger_for_local_peers", lambda: waited.append(signal.getsignal(signal.SIGTERM)))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(SystemExit) as exit_info:
            fail("llmtrain-train", "mode=async_ps with ps.num_servers=1 needs at least 2 processes", 2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("llmtrain-train: error: mode=async_ps with ps.num_servers=1 needs at least 2 "
                                       "processes\n")
    assert waited == ([] if main else [signal.SIG_DFL])


@pytest.mark.parametrize("main", [True, False])
def test_a_refusal_every_process_reaches_is_said_by_the_main_one_only(monkeypatch, capsys, main):
    import llmtrain.cli._entry as entry

    monkeypatch.setenv("RANK", "0" if main else "1")
    waited = []
    monkeypatch.setattr(entry, "linger_for_local_peers", lambda: waited.append(True))
    with pytest.raises(SystemExit) as exit_info:
        run_task("llmtrain-train", lambda cfg: (_ for _ in ()).throw(AgreedError("every checkpoint is damaged")), None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("llmtrain-train: error: every checkpoint is damaged\n" if main else "")
    assert waited == ([] if main else [True])  # a peer waits, so that the main process ends first


@pytest.mark.parametrize(("error", "code"), [(UserError("bad folder"), 2), (RunDiverged("loss stayed nan"), 3)])
def test_a_user_error_ends_with_its_own_exit_code(capsys, error, code):
    def task(cfg):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_task("llmtrain-train", task, None)
    assert exit_info.value.code == code
    assert capsys.readouterr().err == f"llmtrain-train: error: {error}\n"


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ModelConfig(n_kv_head=-2), "model.n_kv_head=-2 must be >= 0"),
    (lambda: RunConfig(dir=" "), "run.dir is empty"),
    (lambda: TrainedRef(dir=""), "run.dir is empty: give a run, checkpoint or exported folder"),
    (lambda: TrainedRef(dir="r", step=-1), "run.step=-1 must be >= 0"),
    (lambda: GenerateConfig(run=TrainedRef(dir="r"), temperature=math.nan), "temperature=nan must be >= 0 and finite"),
    (lambda: GenerateConfig(run=TrainedRef(dir="r"), top_p=math.nan), "top_p=nan must be in (0, 1]"),
    (lambda: GenerateConfig(run=TrainedRef(dir="r"), top_k=-1), "top_k=-1 must be >= 0"),
    (lambda: GenerateConfig(run=TrainedRef(dir="r"), max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
    (lambda: GenerateConfig(run=TrainedRef(dir="r"), seed=2**64), "seed=18446744073709551616 must be <= 2**63 - 1"),
    (lambda: GenerateConfig(run=TrainedRef(dir="r"), batch_size=0), "batch_size=0 must be >= 1"),
    (lambda: ExportConfig(run=TrainedRef(dir="r"), out=""), "out is empty: give the output folder"),
    (lambda: EvalConfig(run=TrainedRef(dir="r"), max_windows=-1), "max_windows=-1 must be >= 0"),
    (lambda: EvalConfig(run=TrainedRef(dir="r"), batch_size=0), "batch_size=0 must be >= 1"),
    (lambda: EvalConfig(run=TrainedRef(dir="r"), tasks=["a"], num_fewshot=-1), "num_fewshot=-1 must be >= 0"),
    (lambda: EvalConfig(run=TrainedRef(dir="r"), tasks=[" "]), "names an empty task"),
    (lambda: NgramConfig(data=DataConfig(dir="d"), order=0), "order=0 must be >= 1"),
    (lambda: NgramConfig(data=DataConfig(dir="d"), discount=math.nan), "discount=nan must be in [0, 1)"),
    (lambda: NgramConfig(data=DataConfig(dir="d"), block_size=0), "block_size=0 must be >= 1"),
    (lambda: NgramConfig(data=DataConfig(dir="d"), train_tokens=-1), "train_tokens=-1 must be >= 0"),
    (lambda: CompareSection(dir="c", compute_ranks=0), "compare.compute_ranks=0 must be >= 1"),
    (lambda: CompareSection(dir=""), "compare.dir is empty"),
    (lambda: PSConfig(timeout_s=0), "ps.timeout_s=0 must be >= 1"),
    (lambda: DataConfig(dir="d", shard_tokens=1 << 50), "data.shard_tokens=1125899906842624 must be <= 1099511627776"),
    (lambda: DataConfig(dir="d", hf_split=""), "data.hf_split is empty"),
])
def test_every_root_checks_its_ranges(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_the_problems_of_every_section_are_one_line():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.dir=x", "run.dir=y", "optim.lr=nan", "optim.eps=-1",
                                                      "model.n_kv_head=-2", "dist.timeout_s=0"])
    with pytest.raises(ValueError) as refused:
        to_typed(cfg, TrainConfig)
    assert str(refused.value) == ("invalid model config: model.n_kv_head=-2 must be >= 0; invalid optim config: "
                                  "optim.lr=nan must be > 0 and finite; optim.eps=-1.0 must be > 0 and finite; "
                                  "invalid dist config: dist.timeout_s=0 must be >= 1")
