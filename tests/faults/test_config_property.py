"""Every value of every field of the training config either trains or is refused in one line with exit code 2.

Values are drawn per field of ``TrainConfig`` (the dataclass tree is walked, so a new field is drawn too): in range,
out of range, NaN and infinities, negative, zero, empty, huge, non-ASCII text, wrong types, and text Hydra's grammar
cannot parse. Each example changes two to four fields of a cheap base run (``model=tiny``, one step) and goes the
way the CLI goes, in this process: the config is composed and checked as ``_precheck`` does it; an accepted config
is trained by ``cli.train.run`` through ``run_task``, as ``hydra_command`` runs it. Refused means ``SystemExit(2)``
with exactly one ``llmtrain-train: error:`` line; anything else (another exception, another code) fails the test
with the overrides that caused it.

In-process keeps it within CI's budget (~3 minutes on 2 cores for 100 examples, about a third of them trained): a
one-step run in this process takes 2-3 s, a process ~15 s. Two to four fields per example: each example exercises
several fields, and fewer examples pay for a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import types
import typing
from enum import Enum
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from llmtrain.cli._entry import CONF_DIR, _precheck, quote_verbatim, run_task, to_typed
from llmtrain.config import TrainConfig, register_configs

pytestmark = pytest.mark.slow

COMMAND = "llmtrain-train"
# The base run every example changes: one step of the tiny model on a small batch, evaluated on a few windows.
# train.stop_at_step=1 bounds every run to one step whatever train.max_steps is drawn (the schedule still spans
# max_steps); the drawn train.stop_at_step values are 1 or refused ones (see SMALL), never 0 ("run to max_steps").
BASE = ["model=tiny", "precision=fp32", "train.max_steps=2", "train.stop_at_step=1", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.eval_windows=4", "train.eval_every=0", "train.log_every=1",
        "train.checkpoint_every=0", "wandb.mode=disabled"]
# Not drawn: wandb.mode=online needs a login and the network, offline starts wandb's service process (seconds per
# example) -- the wandb names are drawn and checked all the same; dist.deepspeed_overrides is free-form text handed
# to DeepSpeed (its known keys are checked by build_ds_config, tests/unit/test_train_config.py).
NOT_DRAWN = {"wandb.mode", "dist.deepspeed_overrides"}

HUGE = [2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
NOT_NUMBERS = ["x", "''", "é", "[1]", "{a: 1}", "null", "1.5.2"]
# Fields whose in-range values set how long one step takes (model size, batch) or whether it stops after one:
# in range they are drawn small, so that the examples fit the budget; out of range (below the minimum, over the
# cap, huge, not a number) they are drawn like every other field. Their upper bounds are unit-tested.
SMALL = {
    "model.n_layer": [1, 2, 3], "model.n_head": [1, 2, 4], "model.n_kv_head": [0, 1, 2], "model.n_embd": [8, 16, 64],
    "model.block_size": [1, 8, 64], "model.mlp_hidden": [0, 1, 96], "model.vocab_size": [0, 260, 1024, 2000],
    "train.global_batch_size": [1, 2, 4, 6], "train.micro_batch_size": [1, 2, 3], "train.stop_at_step": [1],
    "train.compile": ["null", "false"],  # true: torch.compile's first compile, ~30 s (tests/integration/test_train.py)
    "train.slow_rank_factor": [1, 1.5],  # the one rank of these runs is the straggler: 1000 would sleep minutes
}
SMALL_REFUSED = [-1, 0, 2**20, *HUGE]


def fields_of(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, type) of every leaf field of a dataclass tree."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            leaves += fields_of(kind, f"{prefix}{f.name}.")
        else:
            leaves.append((f"{prefix}{f.name}", kind))
    return leaves


# Text with spaces, non-ASCII and shell/Hydra specials; no '/' or '.', so that a drawn folder stays where it is put.
TEXT = st.text(st.sampled_from("ab Zé日-_;&#~!'\"$"), max_size=6)


def folder_values(root: Path, extra: list[str]) -> st.SearchStrategy[str]:
    """A folder option: empty, spaces, or a name under ``root`` (absent, so refused when it must hold data)."""
    named = TEXT.filter(lambda s: s.strip()).map(lambda s: quote_verbatim(str(root / s)))
    return st.one_of(st.sampled_from(["''", "'  '", *extra]), named)


def values(name: str, kind: object, root: Path, prepared: Path) -> st.SearchStrategy[str]:
    """Override values (Hydra syntax) for one field."""
    if name in SMALL:
        return st.sampled_from([str(v) for v in SMALL[name] + SMALL_REFUSED] + NOT_NUMBERS)
    if name == "run.dir":
        return folder_values(root / "runs", [])
    if name == "data.dir":
        return folder_values(root / "data", [str(prepared)])
    if name in ("model.init_from", "data.tokenizer_path"):
        return folder_values(root / "absent", ["null"])
    if name == "data.mix":  # drawn with data.dir='' (see overrides)
        return st.sampled_from(["null", "[]", f"[{{dir: {prepared}}}]", f"[{{dir: {prepared}, weight: 0}}]",
                                f"[{{dir: {prepared}, weight: nan}}]", f"[{{dir: {root}}}]", "[{dir: ''}]", "x"])
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # X | None
        inner = next(a for a in args if a is not type(None))
        return st.one_of(st.just("null"), values(name, inner, root, prepared))
    if origin is list:
        items = TEXT.map(quote_verbatim)
        return st.one_of(st.lists(items, max_size=3).map(lambda xs: f"[{','.join(xs)}]"), st.sampled_from(["x", "1"]))
    if isinstance(kind, type) and issubclass(kind, Enum):
        return st.sampled_from([m.value for m in kind] + ["nope", "1", "''"])
    if kind is bool:
        return st.sampled_from(["true", "false", "null", "2", "x"])
    if origin in (typing.Union, types.UnionType) and set(args) == {bool, str}:  # a switch with words: auto | true
        return st.sampled_from(["auto", "true", "false", "'True'", "null", "2", "x", "''"])
    if kind is int:
        return st.one_of(st.integers(-3, 70).map(str), st.integers().map(str), st.sampled_from(
            [str(v) for v in HUGE] + NOT_NUMBERS + ["nan", "1.5"]))
    if kind is float:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.floats(0, 1).map(repr), st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e309"]),
                         st.sampled_from(NOT_NUMBERS))
    if kind is str:  # quoted (any text reaches the field) or raw (Hydra's grammar may refuse it)
        return st.one_of(TEXT.map(quote_verbatim), TEXT)
    raise AssertionError(f"{name}: no values for a field of type {kind}; add them here")


def overrides(root: Path, prepared: Path) -> st.SearchStrategy[list[str]]:
    drawn = {name: values(name, kind, root, prepared) for name, kind in fields_of(TrainConfig)
             if name not in NOT_DRAWN}

    @st.composite
    def pick(draw) -> list[str]:
        names = draw(st.lists(st.sampled_from(sorted(drawn)), min_size=2, max_size=4, unique=True))
        chosen = [f"{name}={draw(drawn[name])}" for name in names]
        if "data.mix" in names and "data.dir" not in names:
            chosen.insert(0, "data.dir=''")
        return chosen

    return pick()


def compose(argv: list[str]) -> TrainConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=COMMAND):
        return to_typed(hydra_compose(config_name="train", overrides=argv), TrainConfig)


def refused_or_trained(argv: list[str]) -> str:
    """``"trained"``, or the one error line of a refusal; fails on anything else."""
    from llmtrain.cli.train import run

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _precheck(COMMAND, "train", TrainConfig, argv)
            run_task(COMMAND, run, compose(argv))
    except SystemExit as exc:
        lines = [line for line in err.getvalue().splitlines() if line.startswith(f"{COMMAND}: error: ")]
        assert exc.code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), (exc.code, err.getvalue())
        return lines[0]
    return "trained"


def test_every_drawn_value_trains_or_is_refused_in_one_line(prepared_small, tmp_path, monkeypatch):
    import torch.distributed

    register_configs()
    monkeypatch.setenv("GLIBC_TUNABLES", "")  # ZeRO >= 1 on a CPU host would re-execute this process with them
    monkeypatch.setenv("WANDB_MODE", "disabled")
    saved = dict(os.environ)  # the first run sets RANK, WORLD_SIZE, MASTER_PORT...: later tests must not see them
    outcomes: dict[tuple[str, ...], str] = {}

    @settings(max_examples=100, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(overrides(tmp_path / "drawn", prepared_small))
    def check(drawn: list[str]) -> None:
        note("overrides: " + " ".join(drawn))
        key = tuple(drawn)
        if key in outcomes:  # the same config again: its outcome cannot change
            return
        run_dir = tmp_path / "runs" / f"run{len(outcomes)}"
        argv = [f"data.dir={prepared_small}", f"run.dir={run_dir}", *BASE, *drawn]
        outcomes[key] = refused_or_trained(argv)

    try:
        check()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    trained = sum(outcome == "trained" for outcome in outcomes.values())
    assert 0 < trained < len(outcomes), outcomes  # both kinds of outcome were exercised
