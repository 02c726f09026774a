"""Every workaround of DeepSpeed or torch internals in llmtrain, in one module, each earning its keep.

Each is a :class:`Workaround` constant: the upstream behaviour it works around, the versions it was checked
against, where it runs, and the upstream functions it replaces or calls (their parameter names, and the lines of
their source it is written against). All of them follow the same rules:

- A workaround runs only where it was measured to help: DeepSpeed's CPU accelerator, gloo groups, the ZeRO stages
  it names. None was measured on CUDA/NCCL, so there DeepSpeed's and torch's own code runs. The one exception,
  :data:`ZERO3_UNIVERSAL_LOAD`, mends values rather than speed: it runs after every ZeRO-3 universal load.
- Before one is installed its upstream functions are looked up and their parameters compared (:func:`usable`): one
  missing or changed skips the workaround with one warning line, and the run goes on with upstream's behaviour.
  tests/unit/test_workarounds.py makes the same check and reads the source lines too, so CI fails on such an upgrade.

Upstream settings that might have replaced a patch, checked in DeepSpeed 0.19.8 (runtime/zero/config.py,
runtime/config.py, runtime/engine.py, runtime/zero/stage3.py); none does:

- ``zero_optimization.allgather_partitions`` ("allgather collective or a series of broadcast collectives") is
  declared and parsed, but no optimizer reads it (``engine.zero_allgather_partitions()`` has no caller): ZeRO-1/2 and
  the bf16 optimizer always call ``all_gather_dp_groups``. The top-level ``disable_allgather`` is parsed, read nowhere.
- ZeRO-3's fp32 master copy: no setting selects the branch that reuses the partition (``torch_autocast`` goes through
  the same str/``torch.device`` comparison; ``offload_optimizer`` copies the partition to the CPU on purpose).
- One process at ZeRO-0: no setting skips the gradient all-reduce. ``engine.no_sync()`` does, but it also stops
  DeepSpeed counting accumulation boundaries and forbids ``engine.step()`` inside it.

Process-level tricks keep their own modules, under the same rules: ``llmtrain/allocator.py`` (the glibc malloc
re-exec, ``TUNED_MALLOC``) and ``llmtrain/distributed/exit.py`` (ending without finalization, ``NO_FINALIZATION``;
the linger, ``LINGER``). ``ChunkedAdamW`` (llmtrain/optim.py) steps through torch's private optimizer set-up:
``CHUNKED_ADAMW`` here.

Imports neither torch nor DeepSpeed at import: allocator.py and exit.py read their records before torch is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upstream:
    """A function (or attribute) of DeepSpeed, torch or Python that a workaround replaces or calls.

    ``parameters``: for a ``replaced`` function exactly its parameter names, in order (the replacement takes the same
    arguments); for a called one the names it is called with, all by keyword (each must exist, no other may be
    required); None: only its existence counts. ``source``: lines of its source the workaround is written against,
    checked by the tests only (an install without source files still runs)."""

    path: str  # "module:qualified.name"
    parameters: tuple[str, ...] | None = None
    replaced: bool = False
    source: tuple[str, ...] = ()

    def find(self) -> Any:
        """The object at ``path``, or None where its module or name is gone."""
        module_name, _, qualname = self.path.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
        except ImportError:
            return None
        for name in qualname.split("."):
            found = getattr(found, name, None)
            if found is None:
                return None
        return found

    def problem(self) -> str | None:
        """Why a workaround written against this must not run (gone, or other parameters), or None."""
        found = self.find()
        if found is None:
            return f"{self.path} is gone"
        if self.parameters is None:
            return None
        try:
            params = inspect.signature(found).parameters  # an installed replacement reports its original's
        except (TypeError, ValueError):
            return f"{self.path} has no readable signature"
        now = f"{self.path} now takes ({', '.join(params)})"
        if self.replaced:
            return None if tuple(params) == self.parameters else f"{now}, not ({', '.join(self.parameters)})"
        unknown = [n for n in self.parameters if n not in params or params[n].kind == inspect.Parameter.POSITIONAL_ONLY]
        required = [n for n, p in params.items() if n not in self.parameters and p.default is p.empty
                    and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if unknown or required:
            return f"{now}: called with {', '.join(unknown)} by name, missing {', '.join(required) or 'nothing'}"
        return None


@dataclass(frozen=True)
class Workaround:
    """One workaround: what upstream does that it works around, what it was checked with, where it runs."""

    name: str
    works_around: str
    checked_with: str
    runs_where: str
    upstream: tuple[Upstream, ...] = ()

    def problems(self) -> list[str]:
        return [problem for u in self.upstream if (problem := u.problem()) is not None]


@functools.cache
def usable(workaround: Workaround) -> bool:
    """Whether ``workaround``'s upstream functions are there with the parameters it was written against; if not, one
    warning line (once per process) and False: the caller runs upstream's own code instead."""
    problems = workaround.problems()
    if problems:
        log.warning("llmtrain: %s skipped, upstream's own code runs instead: %s (written against %s)",
                    workaround.name, "; ".join(problems), workaround.checked_with)
    return not problems


_STAGE3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"
_ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
GATHER_PARAMETERS = ("groups_flat", "partitioned_param_groups", "dp_process_group", "start_alignment_factor",
                     "allgather_bucket_size")

FP32_MASTER = Workaround(
    name="ZeRO-3 fp32 master is the partition",
    works_around="DeepSpeed ZeRO-3's _create_fp32_partitions means to use an fp32 parameter partition as its own fp32 "
                 "master, but compares the partition's torch.device with self.device, a device name (str): they "
                 "never compare equal, so every fp32 partition is cloned (20 bytes per parameter per rank where ZeRO "
                 "counts 16); no upstream issue found",
    checked_with="deepspeed 0.19.8, torch 2.13.0",
    runs_where="ZeRO-3 on DeepSpeed's CPU accelerator, optimizer not offloaded (measured at 350m fp32 on 2 CPU ranks: "
               "0.58 GiB less per rank); bf16 takes another branch and is untouched",
    upstream=(Upstream(f"{_STAGE3}._create_fp32_partitions", ("self",), replaced=True,
                       source=("self.fp16_partitioned_groups_flat[i].device == self.device:",
                               "elif self.offload_optimizer:")),
              Upstream(f"{_STAGE3}.__init__", source=(
                  "self.device = get_accelerator().current_device_name() if not self.offload_optimizer",))))

BROADCAST_GATHER = Workaround(
    name="broadcast gather over gloo",
    works_around="after each step ZeRO-1/2 and the bf16 optimizer gather the updated weight partitions with one "
                 "all_gather_into_tensor (all_gather_dp_groups), which gloo copies through its ring: 50-58 ms where "
                 "one broadcast per partition takes 14-15 ms (13.8M fp32 elements, 2 CPU ranks; 4 ranks 88-90 "
                 "against 32-35 ms; at ZeRO-2 it was 87 ms of a 1.15 s `small` step); bitwise the same values",
    checked_with="deepspeed 0.19.8, torch 2.13.0 (gloo)",
    runs_where="ZeRO-1/2 on DeepSpeed's CPU accelerator, and per call only for gloo groups (others keep DeepSpeed's)",
    upstream=(Upstream("deepspeed.runtime.zero.stage_1_and_2:all_gather_dp_groups", GATHER_PARAMETERS, replaced=True),
              Upstream("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.step",
                       source=("all_gather_dp_groups(groups_flat=self.bit16_groups_flat,",)),
              Upstream("deepspeed.runtime.bf16_optimizer:all_gather_dp_groups", GATHER_PARAMETERS, replaced=True),
              Upstream("deepspeed.runtime.bf16_optimizer:BF16_Optimizer.update_lp_params",
                       source=("all_gather_dp_groups(groups_flat=self.bf16_groups_flat,",)),
              Upstream("torch.distributed:broadcast", ("tensor", "group", "group_src", "async_op"))))

LONE_ALLREDUCE = Workaround(
    name="no gradient all-reduce of a lone ZeRO-0 rank",
    works_around="DeepSpeed's engine all-reduces ZeRO-0 gradients after each backward even with one data-parallel "
                 "rank: every gradient copied into flat buckets, reduced with itself and copied back (1% of a "
                 "`small` step on CPU); the engine's enable_backward_allreduce switch is turned off, no value changes",
    checked_with="deepspeed 0.19.8",
    runs_where="ZeRO-0 with one data-parallel rank on DeepSpeed's CPU accelerator",
    upstream=(Upstream(f"{_ENGINE}._backward_epilogue",
                       source=("if self.enable_backward_allreduce and not self.inside_no_sync_ctxt:",)),
              Upstream(f"{_ENGINE}.step",
                       source=("elif self.enable_backward_allreduce and not self.inside_no_sync_ctxt:",)),
              Upstream(f"{_ENGINE}.__init__", source=("self.enable_backward_allreduce = True",)),
              Upstream(f"{_ENGINE}._configure_distributed_model", source=("self.dp_world_size = ",))))

CHUNKED_ADAMW = Workaround(
    name="ChunkedAdamW",
    works_around="torch's foreach AdamW allocates temporaries as large as everything it steps at once, a whole ZeRO "
                 "partition (0.6 GB per rank at 350m on 2 ranks); ChunkedAdamW steps views of 1M elements through "
                 "torch's private state set-up (Optimizer._init_group) and its functional adam",
    checked_with="torch 2.13.0",
    runs_where="CPU only (build_optimizer gives CUDA fused AdamW); a step with a closure, amsgrad, maximize or "
               "capturable is torch's own",
    upstream=(Upstream("torch.optim:AdamW._init_group", ("self", "group", "params_with_grad", "grads", "exp_avgs",
                                                          "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
                       source=("return has_complex",)),
              Upstream("torch.optim.adam:adam", (
                  "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "foreach",
                  "capturable", "differentiable", "fused", "grad_scale", "found_inf", "has_complex",
                  "decoupled_weight_decay", "amsgrad", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize"))))


ZERO3_UNIVERSAL_LOAD = Workaround(
    name="ZeRO-3 universal load: each optimizer group's settings, each sub-group's own step",
    works_around="DeepSpeed ZeRO-3's universal load (load_hp_checkpoint_state_from_checkpoint_dir_stage3) restores "
                 "the fp32 weights and Adam moments exactly, but (1) hands the one step tensor of the checkpoint's "
                 "first state to every sub-group: torch's Adam counts a step in place, once per sub-group, so with "
                 "4 sub-groups each optimizer step after the resume counted 4 (bias corrections of steps 21-24 in "
                 "step 21, of 25-28 in step 22, ...); and (2) copies the settings of the checkpoint's first "
                 "optimizer group into every group, so llmtrain's no_decay group (norms, biases) took the decay "
                 "group's weight_decay. A ZeRO-3 run resumed on another world size drifted from the uninterrupted "
                 "run from its second step on (`tiny`, 2 ranks -> 1: 6e-6 relative at step 22, 1e-3 by step 33). "
                 "ZeRO-1/2 restore group by group (base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir). "
                 "Each sub-group's step is made its own tensor and each group's settings are set again, group by "
                 "group, from the same file; no upstream issue found",
    checked_with="deepspeed 0.19.8, torch 2.13.0",
    runs_where="after every ZeRO-3 load through the universal format, on any accelerator: it restores values "
               "(2 ranks -> 1 then matches the uninterrupted run within 1e-7, as ZeRO-2 does)",
    upstream=(Upstream(f"{_STAGE3}.load_hp_checkpoint_state_from_checkpoint_dir_stage3", source=(
        "state_step = optim_sd[OPTIMIZER_STATE_DICT]['state'][0]['step']",
        "self.optimizer.state[fp32_param]['step'] = state_step",
        'optim_sd[OPTIMIZER_STATE_DICT]["param_groups"][0].items()',
        "param_group['params'] = []")),))


def mend_zero3_universal_load(optimizer: Any, universal: str) -> None:
    """:data:`ZERO3_UNIVERSAL_LOAD`: after DeepSpeed's ZeRO-3 load of the universal checkpoint in folder ``universal``
    (its ``zero/optimizer_state.pt``), give each state of ``optimizer``'s torch optimizer a step tensor of its own
    (same value), and set each group to the saved group of the same index, every setting but ``params`` (which
    DeepSpeed's ZeRO-3 keeps empty between steps). Where the saved groups are not as many as this optimizer's, one
    warning and the groups as DeepSpeed left them."""
    if not usable(ZERO3_UNIVERSAL_LOAD):
        return
    import os

    import torch
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    for state in optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    # at ZeRO-3 the file also holds rank 0's fp32 partition and Adam moments: mapped, never read, for its groups
    saved = torch.load(os.path.join(universal, "zero", "optimizer_state.pt"), map_location="cpu",
                       weights_only=False, mmap=True)[OPTIMIZER_STATE_DICT][PARAM_GROUPS]
    groups = optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        log.warning("llmtrain: %s: the checkpoint has %d optimizer group(s), this optimizer %d; every group keeps the "
                    "first saved group's settings", ZERO3_UNIVERSAL_LOAD.name, len(saved), len(groups))
        return
    for group, saved_group in zip(groups, saved, strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def on_cpu_accelerator() -> bool:
    """Whether DeepSpeed runs on its CPU accelerator: where every DeepSpeed workaround here was measured."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


@contextlib.contextmanager
def around_initialize(zero_stage: int) -> Iterator[None]:
    """The workarounds that apply to one ``deepspeed.initialize`` at ``zero_stage``: none off DeepSpeed's CPU
    accelerator; the broadcast gather at ZeRO-1/2 (for the process); the fp32 master fix at ZeRO-3 (for the call)."""
    if not on_cpu_accelerator():
        yield
        return
    if zero_stage in (1, 2):
        install_broadcast_gathers()
    with fp32_master_is_the_partition() if zero_stage == 3 else contextlib.nullcontext():
        yield


def after_initialize(engine: Any, zero_stage: int) -> None:
    """What applies to the engine ``deepspeed.initialize`` made: :data:`LONE_ALLREDUCE`."""
    if zero_stage != 0 or not on_cpu_accelerator() or not usable(LONE_ALLREDUCE):
        return
    if not (hasattr(engine, "dp_world_size") and hasattr(engine, "enable_backward_allreduce")):
        log.warning("llmtrain: %s skipped: the engine has no dp_world_size or enable_backward_allreduce (written "
                    "against %s)", LONE_ALLREDUCE.name, LONE_ALLREDUCE.checked_with)
        return
    if engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


@contextlib.contextmanager
def fp32_master_is_the_partition() -> Iterator[None]:
    """:data:`FP32_MASTER`: for the length of ``deepspeed.initialize``, ZeRO-3's ``_create_fp32_partitions`` compares
    against a ``torch.device``, so it takes its own no-copy branch. The optimizer then updates the partition in place
    and DeepSpeed's copy back to it is a copy onto itself."""
    if not usable(FP32_MASTER):
        yield
        return
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions
    Stage3._create_fp32_partitions = fp32_partitions_without_copy(original)
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original


def fp32_partitions_without_copy(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """``original`` (``_create_fp32_partitions``) run with ``self.device`` as a ``torch.device``, restored after."""
    import torch

    def create_fp32_partitions(self) -> None:
        if not (hasattr(self, "device") and hasattr(self, "offload_optimizer")):
            log.warning("llmtrain: %s skipped: the ZeRO-3 optimizer has no device or offload_optimizer (written "
                        "against %s)", FP32_MASTER.name, FP32_MASTER.checked_with)
            return original(self)
        name = self.device
        if isinstance(name, str) and not self.offload_optimizer:
            self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    create_fp32_partitions.__wrapped__ = original  # its signature is the original's
    return create_fp32_partitions


def gather_by_broadcast(original: Callable[..., None]) -> Callable[..., None]:
    """:data:`BROADCAST_GATHER`: DeepSpeed's ``all_gather_dp_groups`` done as one broadcast per partition where the
    group runs over gloo, and by ``original`` elsewhere (NCCL's all-gather is its fast path). The partitions are views
    of the flat buffer, so the bytes that land are the same."""
    import torch.distributed as dist

    def gather(groups_flat, partitioned_param_groups, dp_process_group, *args, **kwargs) -> None:
        if any(dist.get_backend(group) != "gloo" for group in dp_process_group):
            return original(groups_flat, partitioned_param_groups, dp_process_group, *args, **kwargs)
        for partitions, group in zip(partitioned_param_groups, dp_process_group, strict=True):
            if dist.get_world_size(group) > 1:
                pending = [dist.broadcast(part, group=group, group_src=src, async_op=True)
                           for src, part in enumerate(partitions)]
                for work in pending:
                    work.wait()
        return None

    gather.gathers_by_broadcast = True
    gather.__wrapped__ = original  # its signature is the original's
    return gather


def install_broadcast_gathers() -> None:
    """Install :func:`gather_by_broadcast` where DeepSpeed calls ``all_gather_dp_groups`` (once per process)."""
    if not usable(BROADCAST_GATHER):
        return
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime.zero import stage_1_and_2

    for module in (stage_1_and_2, bf16_optimizer):
        if not getattr(module.all_gather_dp_groups, "gathers_by_broadcast", False):
            module.all_gather_dp_groups = gather_by_broadcast(module.all_gather_dp_groups)
