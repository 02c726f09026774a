"""The workarounds of DeepSpeed and torch internals (llmtrain/workarounds.py, allocator.py, exit.py):
each upstream function they patch or rely on is still there with the parameters and source lines they were written
against (an upgrade that changes one fails here), a changed one is skipped with one warning, and each runs only
where it was measured (DeepSpeed's CPU accelerator, the ZeRO stages named). No process is started."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from types import SimpleNamespace

import pytest
import torch

from llmtrain import workarounds
from llmtrain.allocator import TUNED_MALLOC
from llmtrain.distributed.exit import LINGER, NO_FINALIZATION
from llmtrain.workarounds import (
    BROADCAST_GATHER,
    CHUNKED_ADAMW,
    FP32_MASTER,
    GATHER_PARAMETERS,
    LONE_ALLREDUCE,
    ZERO3_UNIVERSAL_LOAD,
    Upstream,
    usable,
)

ALL = [FP32_MASTER, BROADCAST_GATHER, LONE_ALLREDUCE, CHUNKED_ADAMW, ZERO3_UNIVERSAL_LOAD, TUNED_MALLOC,
       NO_FINALIZATION, LINGER]
UPSTREAM = [u for w in ALL for u in w.upstream]


@pytest.fixture(autouse=True)
def fresh_checks():
    """Each test sees its own checks (and warnings): ``usable`` remembers its answer for the process."""
    usable.cache_clear()
    yield
    usable.cache_clear()


@pytest.fixture
def unpatched(monkeypatch):
    """DeepSpeed's own all_gather_dp_groups in both modules for this test (an earlier one may have installed ours)."""
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime.zero import stage_1_and_2

    for module in (stage_1_and_2, bf16_optimizer):
        monkeypatch.setattr(module, "all_gather_dp_groups", inspect.unwrap(module.all_gather_dp_groups))
    return stage_1_and_2, bf16_optimizer


@pytest.mark.parametrize("workaround", ALL, ids=lambda w: w.name)
def test_each_names_what_it_works_around_and_the_versions_checked(workaround):
    assert len(workaround.works_around) > 40 and workaround.runs_where
    assert re.search(r"\b(deepspeed|torch|glibc) \d+\.\d+", workaround.checked_with), workaround.checked_with


@pytest.mark.parametrize("upstream", UPSTREAM, ids=lambda u: u.path)
def test_upstream_is_still_there_with_the_parameters_it_was_written_against(upstream):
    """Fails when an upgrade of DeepSpeed, torch or Python renames, removes or re-signs what a workaround patches or
    calls: then look at the workaround again (drop it where upstream fixed the behaviour)."""
    assert upstream.problem() is None


@pytest.mark.parametrize("upstream", [u for u in UPSTREAM if u.source], ids=lambda u: u.path)
def test_upstream_source_still_holds_the_lines_it_was_written_against(upstream):
    source = inspect.getsource(inspect.unwrap(upstream.find()))
    missing = [line for line in upstream.source if line not in source]
    assert not missing, f"{upstream.path} changed: {missing}"


def test_the_signatures_named():
    """The same checks, spelled out for the functions patched or called (inspect.signature of what is installed)."""
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    def names(fn):
        return tuple(inspect.signature(fn).parameters)

    assert names(stage_1_and_2.all_gather_dp_groups) == names(bf16_optimizer.all_gather_dp_groups) == GATHER_PARAMETERS
    assert names(DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions) == ("self",)
    assert names(torch.optim.AdamW._init_group) == ("self", "group", "params_with_grad", "grads", "exp_avgs",
                                                    "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
    from torch.optim.adam import adam

    assert names(adam) == ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "foreach",
                           "capturable", "differentiable", "fused", "grad_scale", "found_inf", "has_complex",
                           "decoupled_weight_decay", "amsgrad", "beta1", "beta2", "lr", "weight_decay", "eps",
                           "maximize")  # ChunkedAdamW passes every one by name (CHUNKED_ADAMW)


def five(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor, allgather_bucket_size):
    """A stand-in for an upstream function, found by its path like one."""


def called(a, b, c=1, *, d):
    """A stand-in for an upstream function that a workaround calls by keyword."""


def test_a_replaced_function_must_match_exactly_a_called_one_must_bind():
    assert Upstream(f"{__name__}:five", GATHER_PARAMETERS, replaced=True).problem() is None
    assert Upstream(f"{__name__}:five", GATHER_PARAMETERS[:4], replaced=True).problem() is not None
    assert Upstream(f"{__name__}:called", ("a", "b", "d")).problem() is None  # c is optional
    assert "missing d" in Upstream(f"{__name__}:called", ("a", "b")).problem()  # d is required
    assert Upstream(f"{__name__}:called", ("a", "b", "d", "e")).problem() is not None  # there is no e
    assert Upstream(f"{__name__}:gone").problem() == f"{__name__}:gone is gone"
    assert Upstream("no_such_module:f").problem() == "no_such_module:f is gone"


def test_a_changed_upstream_is_skipped_with_one_warning(unpatched, caplog):
    stage_1_and_2, bf16_optimizer = unpatched

    def changed(groups_flat, partitioned_param_groups, dp_process_group):  # as if an upgrade dropped two
        pass

    stage_1_and_2.all_gather_dp_groups = changed  # restored by `unpatched`
    with caplog.at_level(logging.WARNING, logger=workarounds.__name__):
        workarounds.install_broadcast_gathers()
        workarounds.install_broadcast_gathers()
    assert stage_1_and_2.all_gather_dp_groups is changed  # DeepSpeed's own code runs
    assert not getattr(bf16_optimizer.all_gather_dp_groups, "gathers_by_broadcast", False)  # both or neither
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broadcast gather" in warnings[0].getMessage()
    assert "now takes (groups_flat, partitioned_param_groups, dp_process_group)" in warnings[0].getMessage()


def test_a_missing_upstream_is_skipped_with_one_warning(monkeypatch, caplog):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    monkeypatch.delattr(Stage3, "_create_fp32_partitions")
    with caplog.at_level(logging.WARNING, logger=workarounds.__name__), workarounds.fp32_master_is_the_partition():
        assert not hasattr(Stage3, "_create_fp32_partitions")  # nothing installed
    assert [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]


def test_chunked_adamw_is_torchs_own_step_when_torchs_adam_changed(monkeypatch, caplog):
    from llmtrain import optim

    adam = CHUNKED_ADAMW.upstream[1]
    renamed = Upstream(adam.path, (*adam.parameters, "renamed"))  # as if an upgrade renamed a keyword
    monkeypatch.setattr(optim, "CHUNKED_ADAMW", dataclasses.replace(CHUNKED_ADAMW, upstream=(renamed,)))
    results = []
    for cls in (torch.optim.AdamW, optim.ChunkedAdamW):
        param = torch.arange(6.0).requires_grad_()
        opt = cls([param], lr=0.1, foreach=True)
        param.grad = torch.ones(6)
        with caplog.at_level(logging.WARNING, logger=workarounds.__name__):
            opt.step()
        results.append(param.detach())
    assert torch.equal(*results)
    assert [r for r in caplog.records if "ChunkedAdamW skipped" in r.getMessage() and "renamed" in r.getMessage()]


def test_on_cuda_no_deepspeed_workaround_is_installed(monkeypatch, unpatched):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    stage_1_and_2, bf16_optimizer = unpatched
    original = Stage3._create_fp32_partitions
    monkeypatch.setattr(workarounds, "on_cpu_accelerator", lambda: False)
    for stage in (0, 1, 2, 3):
        with workarounds.around_initialize(stage):
            assert Stage3._create_fp32_partitions is original
            assert not getattr(stage_1_and_2.all_gather_dp_groups, "gathers_by_broadcast", False)
        engine = SimpleNamespace(dp_world_size=1, enable_backward_allreduce=True)
        workarounds.after_initialize(engine, stage)
        assert engine.enable_backward_allreduce


def test_on_the_cpu_accelerator_each_applies_at_its_stages(monkeypatch, unpatched):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    stage_1_and_2, bf16_optimizer = unpatched
    original = Stage3._create_fp32_partitions
    monkeypatch.setattr(workarounds, "on_cpu_accelerator", lambda: True)
    for stage in (0, 3):  # the gather is for ZeRO-1/2 only
        with workarounds.around_initialize(stage):
            assert (Stage3._create_fp32_partitions is not original) is (stage == 3)
            assert inspect.unwrap(Stage3._create_fp32_partitions) is original
        assert Stage3._create_fp32_partitions is original  # for the initialize call only
        assert not getattr(stage_1_and_2.all_gather_dp_groups, "gathers_by_broadcast", False)
    with workarounds.around_initialize(2):
        assert Stage3._create_fp32_partitions is original
    for module in (stage_1_and_2, bf16_optimizer):
        assert module.all_gather_dp_groups.gathers_by_broadcast  # for the process: DeepSpeed calls it at each step

    for stage, dp_world, skipped in [(0, 1, True), (0, 2, False), (1, 1, False)]:
        engine = SimpleNamespace(dp_world_size=dp_world, enable_backward_allreduce=True)
        workarounds.after_initialize(engine, stage)
        assert engine.enable_backward_allreduce is not skipped, (stage, dp_world)


def test_an_engine_without_the_attributes_is_left_alone_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(workarounds, "on_cpu_accelerator", lambda: True)
    engine = SimpleNamespace(dp_world_size=1)
    with caplog.at_level(logging.WARNING, logger=workarounds.__name__):
        workarounds.after_initialize(engine, 0)
    assert not hasattr(engine, "enable_backward_allreduce")
    assert "enable_backward_allreduce" in caplog.text


def test_the_fp32_master_fix_gives_the_comparison_a_device_for_the_call_only():
    seen = []

    def original(self):
        seen.append(self.device)
        if self.offload_optimizer == "fail":
            raise RuntimeError("boom")

    fixed = workarounds.fp32_partitions_without_copy(original)
    optimizer = SimpleNamespace(device="cpu", offload_optimizer=False)
    fixed(optimizer)
    assert seen[-1] == torch.device("cpu") and isinstance(seen[-1], torch.device)
    assert optimizer.device == "cpu"  # DeepSpeed's name again afterwards
    offloaded = SimpleNamespace(device="cpu", offload_optimizer=True)
    fixed(offloaded)
    assert seen[-1] == "cpu"  # the offload branch copies on purpose: untouched
    failing = SimpleNamespace(device="cpu", offload_optimizer="fail")
    with pytest.raises(RuntimeError):
        fixed(failing)
    assert failing.device == "cpu"


def test_the_fp32_master_fix_calls_the_original_alone_when_the_attributes_are_gone(caplog):
    calls = []
    fixed = workarounds.fp32_partitions_without_copy(calls.append)
    bare = SimpleNamespace()
    with caplog.at_level(logging.WARNING, logger=workarounds.__name__):
        fixed(bare)
    assert calls == [bare] and "no device or offload_optimizer" in caplog.text


def test_torchrun_names_the_earliest_failure_by_whole_seconds_then_the_first_rank():
    """What LINGER is for: a rank failing in the same second as the killed peer it followed is named instead."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failures(**timestamps):
        out = {}
        for rank, timestamp in timestamps.items():
            failure = ProcessFailure(local_rank=int(rank[1:]), pid=1, exitcode=1, error_file="/nonexistent")
            failure.timestamp = timestamp
            out[int(rank[1:])] = failure
        return out

    assert isinstance(ProcessFailure(0, 1, 1, "/nonexistent").timestamp, int)  # whole seconds
    assert ChildFailedError("train", failures(r0=100, r1=100)).get_first_failure()[0] == 0  # same second: rank 0
    assert ChildFailedError("train", failures(r0=102, r1=100)).get_first_failure()[0] == 1  # lingered: the peer


def zero3_after_universal_load(tmp_path, saved_groups):
    """A ZeRO-3 optimizer as DeepSpeed's universal load leaves it (one step tensor in every sub-group's state, every
    group with the first saved group's settings), and the universal folder it read (``saved_groups``)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    (tmp_path / "zero").mkdir()
    torch.save({OPTIMIZER_STATE_DICT: {"state": {}, PARAM_GROUPS: saved_groups}},
               tmp_path / "zero" / "optimizer_state.pt")
    step = torch.tensor(20.0)
    flats = [torch.zeros(3) for _ in range(3)]
    first = {k: v for k, v in saved_groups[0].items() if k != "params"}
    torch_optimizer = SimpleNamespace(state={flat: {"step": step, "exp_avg": torch.zeros(3)} for flat in flats},
                                      param_groups=[{**first, "params": []} for _ in range(2)])
    return SimpleNamespace(optimizer=torch_optimizer), flats


def test_the_zero3_universal_load_mend_gives_each_sub_group_its_step_and_each_group_its_settings(tmp_path):
    saved = [{"weight_decay": 0.1, "name": "decay", "lr": 1e-3, "params": [0, 1]},
             {"weight_decay": 0.0, "name": "no_decay", "lr": 1e-3, "params": [2]}]
    optimizer, flats = zero3_after_universal_load(tmp_path, saved)
    workarounds.mend_zero3_universal_load(optimizer, str(tmp_path))
    steps = [optimizer.optimizer.state[flat]["step"] for flat in flats]
    assert len({id(step) for step in steps}) == 3 and all(float(step) == 20.0 for step in steps)
    steps[0] += 1  # torch's Adam counts in place: one sub-group's step no longer moves the others'
    assert [float(step) for step in steps] == [21.0, 20.0, 20.0]
    assert [(g["name"], g["weight_decay"], g["params"]) for g in optimizer.optimizer.param_groups] == [
        ("decay", 0.1, []), ("no_decay", 0.0, [])]  # params: DeepSpeed's ZeRO-3 keeps them empty between steps


def test_the_zero3_universal_load_mend_leaves_groups_it_cannot_pair_with_a_warning(tmp_path, caplog):
    optimizer, _ = zero3_after_universal_load(tmp_path, [{"weight_decay": 0.1, "params": [0]}])
    with caplog.at_level(logging.WARNING):
        workarounds.mend_zero3_universal_load(optimizer, str(tmp_path))
    assert "the checkpoint has 1 optimizer group(s), this optimizer 2" in caplog.text
    assert [g["weight_decay"] for g in optimizer.optimizer.param_groups] == [0.1, 0.1]
