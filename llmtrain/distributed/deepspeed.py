"""DeepSpeed: the config dict, generated from the typed config in one function, and the one initialize call."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from argparse import Namespace
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from llmtrain import workarounds
from llmtrain.config import ModelConfig, Precision, TrainConfig
from llmtrain.distributed.env import select_accelerator
from llmtrain.distributed.parallel import tensor_parallel_section
from llmtrain.errors import AgreedError, UserError
from llmtrain.model import build_model
from llmtrain.optim import clip_grads_, grad_norm, param_groups
from llmtrain.weights import TensorWeights, WeightSource


def grad_accumulation_steps(global_batch: int, micro_batch: int, dp_world: int) -> int:
    """global batch = micro batch x accumulation x data-parallel ranks; refuse what does not divide."""
    per_step = micro_batch * dp_world
    if global_batch % per_step:
        raise AgreedError(f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                          f"{micro_batch} x {dp_world} data-parallel ranks = {per_step}; choose a multiple of "
                          f"{per_step}")
    return global_batch // per_step


# DeepSpeed's documented top-level sections (https://www.deepspeed.ai/docs/config-json/): an override outside them is
# a typo, which DeepSpeed itself would ignore without a word. Nested keys are checked by DeepSpeed's own models.
DEEPSPEED_SECTIONS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "fp16", "bf16",
    "amp", "torch_autocast", "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "aio", "activation_checkpointing", "sparse_attention", "flops_profiler",
    "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity", "autotuning", "data_efficiency",
    "curriculum_learning", "compression_training", "checkpoint", "data_types", "steps_per_print",
    "wall_clock_breakdown", "dump_state", "memory_breakdown", "pipeline", "timers", "dataloader_drop_last",
    "disable_allgather", "graph_harvesting", "compile", "tensor_parallel", "seq_parallel_communication_data_type",
    "use_data_before_expert_parallelism", "hybrid_engine", "nebula", "weight_quantization"})
# Settings llmtrain derives from its own config (the data reader, the loop and checkpoints rely on them).
OWNED = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
         "gradient_accumulation_steps": "train.global_batch_size", "zero_optimization.stage": "dist.zero_stage",
         "bf16.enabled": "precision", "fp16.enabled": "precision", "gradient_clipping": "optim.grad_clip",
         "tensor_parallel.autotp_size": "dist.tensor_parallel", "pipeline": "dist.pipeline_parallel"}


MIN_BUCKET = 1 << 22  # elements: 16 MB in fp32


def buckets_for_width(n_embd: int, zero_stage: int) -> dict[str, int]:
    """Communication bucket sizes and stage-3 limits (elements) from the model's width h.

    As the `transformers` DeepSpeed integration fills its "auto" values: reduce and all-gather buckets of h², a
    stage-3 prefetch of 0.9·h², and stage-3 parameters below 10·h (biases, norms) kept whole on every rank.
    DeepSpeed's defaults (5·10^8 elements, 2 GB in fp32 per bucket) are sized for billions of parameters and
    dominate a smaller model's memory: at 350m on 2 CPU ranks they cost 2.1 GB per rank under ZeRO-3, and 50% more
    time per step. Beyond "auto", stage 3 keeps at most two layers (2·12·h²) gathered, releases a layer's weights
    unless they are used again within one layer's worth of parameters, and steps the optimizer one layer's worth
    (12·h²) at a time: DeepSpeed's defaults (10^9 each) keep the whole model gathered from forward to backward
    and make Adam's temporaries as large as the rank's whole partition (measured at 350m on 2 CPU ranks: peak 6.7
    -> 5.2 GB per rank, 11.7 -> 10.8 s/step). Reduce and all-gather buckets never go below MIN_BUCKET: for a
    narrow model h² buckets only add collectives (measured at `small`, h² = 147k, on 2 CPU ranks: 5% slower at
    ZeRO-2, 5-8% at ZeRO-3; the prefetch size made no difference there)."""
    hidden2, layer = n_embd * n_embd, 12 * n_embd * n_embd
    bucket = max(hidden2, MIN_BUCKET)
    if zero_stage == 3:
        return {"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": int(0.9 * hidden2),
                "stage3_param_persistence_threshold": 10 * n_embd, "stage3_max_live_parameters": 2 * layer,
                "stage3_max_reuse_distance": layer, "sub_group_size": layer}
    return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}


def trainer_clips(cfg: TrainConfig) -> bool:
    """ZeRO-0 in fp32 hands whole gradients straight to the torch optimizer: there the trainer clips them itself, in
    one norm pass whose result it reports. DeepSpeed would clip them in a second, per-parameter pass and drop the
    norm (measured: 1.7% of a `small` step on 1 CPU process). Everywhere else DeepSpeed's optimizer wrapper clips
    and reports the norm."""
    return cfg.dist.zero_stage == 0 and cfg.precision == Precision.fp32


def counted_gradients(engine) -> tuple[list[torch.nn.Parameter], list[tuple[list[torch.nn.Parameter], Any]]]:
    """The parameters of ``engine``'s module that have gradients, and the parts of the whole model's norm: each
    (the parameters this rank counts, the group over which their squares are summed; None: this rank alone), every
    weight counted once. Under tensor parallel the split weights are counted on every rank of the group and the
    whole ones, copies on every rank, on its first; under pipeline parallel each stage's, a tied weight's copy on a
    later stage (DeepSpeed marks it ``ds_pipe_replicated``) left out; under expert parallel each rank's experts
    (DeepSpeed marks them ``allreduce=False``) summed over its expert-parallel group, the rest (copies) on each."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    counted, group = [p for p in params if not getattr(p, "ds_pipe_replicated", False)], None
    if getattr(engine, "is_pipe_parallel", False):
        group = engine.grid.get_pipe_parallel_group()
    elif engine.autotp_size() > 1:
        from deepspeed.runtime.utils import is_model_parallel_parameter

        first = engine.mpu.get_model_parallel_rank() == 0
        counted = [p for p in params if first or is_model_parallel_parameter(p)]
        group = engine.mpu.get_model_parallel_group()
    experts = [p for p in counted if getattr(p, "allreduce", True) is False]
    if not experts:
        return params, [(counted, group)]
    from deepspeed.utils import groups

    (name,) = {p.group_name for p in experts}
    dense = [p for p in counted if getattr(p, "allreduce", True) is not False]
    return params, [(dense, group), (experts, groups._get_expert_parallel_group(name))]


def clip_whole_gradients(engine, max_norm: float) -> torch.Tensor:
    """Clip the whole gradients of ``engine``'s module (``trainer_clips``) to ``max_norm``; the norm before
    clipping (llmtrain's one norm, ``llmtrain.optim.grad_norm``, over ``counted_gradients``), left on the device."""
    params, parts = counted_gradients(engine)
    norms = [grad_norm([p.grad for p in counted], group) for counted, group in parts]
    norm = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()
    clip_grads_([p.grad for p in params], max_norm, norm)
    return norm


def build_ds_config(cfg: TrainConfig, dp_world: int, compile_model: bool = False,
                    model: ModelConfig | None = None) -> dict[str, Any]:
    """The whole DeepSpeed config. Nothing else in llmtrain writes DeepSpeed settings: generated from the typed
    config, then ``dist.deepspeed_overrides`` merged over it (unknown sections and llmtrain's own settings refused).
    ``dp_world``: the data-parallel ranks. ``compile_model`` under ZeRO-3 selects DeepSpeed's DeepCompile (see
    ``should_compile``). ``model``: the model config as it runs (``cfg.model`` unless model.init_from set it), which
    a tensor-parallel partition follows."""
    accum = grad_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_world)
    zero: dict[str, Any] = {"stage": cfg.dist.zero_stage}
    if cfg.dist.zero_stage >= 1:
        zero.update(buckets_for_width(cfg.model.n_embd, cfg.dist.zero_stage))
    if cfg.dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # exports consolidate from the shards
    generated = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0 if trainer_clips(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        # bf16: skip a step whose gradients are not finite (fp32 ZeRO and fp16 do so by default).
        "bf16": {"enabled": cfg.precision == Precision.bf16, "check_grad_overflow": True},
        "fp16": {"enabled": cfg.precision == Precision.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if compile_model and cfg.dist.zero_stage == 3:
        generated["compile"] = {"deepcompile": True}
    if cfg.dist.tensor_parallel > 1:
        generated["tensor_parallel"] = tensor_parallel_section(model or cfg.model, cfg.dist.tensor_parallel)
    if cfg.dist.pipeline_parallel > 1:  # what the pipeline module gets from llmtrain.distributed.pipeline, recorded
        generated["pipeline"] = {"stages": cfg.dist.pipeline_parallel, "partition": cfg.dist.pipeline_partition,
                                 "seed_layers": False, "activation_checkpoint_interval": 0}
    if cfg.dist.tensor_parallel * cfg.dist.sequence_parallel > 1:
        # DeepSpeed checks train_batch_size against every rank of the job where it does not know the layout yet
        # (zero.Init, and initialize before the tensor-parallel groups exist); given the micro-batch and the
        # accumulation only, it derives it. The gradients are averaged over the data-parallel ranks either way.
        del generated["train_batch_size"]
    return merge_overrides(generated, cfg.dist.deepspeed_overrides)


def merge_overrides(generated: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` merged over ``generated`` key by key (nested dicts merged, other values replaced)."""
    unknown = sorted(set(overrides) - DEEPSPEED_SECTIONS)
    if unknown:
        raise AgreedError(f"dist.deepspeed_overrides: unknown DeepSpeed setting(s) {', '.join(unknown)}; see "
                          "https://www.deepspeed.ai/docs/config-json/ for the top-level sections")
    owned = [f"{key} (set {OWNED[key]})" for key in sorted(_dotted(overrides)) if key in OWNED]
    if owned:
        raise AgreedError(f"dist.deepspeed_overrides: {', '.join(owned)} is llmtrain's own setting; change it there")

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return merge(generated, overrides)


def _dotted(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted(value, f"{prefix}{key}.")
    return keys


def build_partitioned(build: Callable[[], torch.nn.Module], ds_config: dict[str, Any]) -> torch.nn.Module:
    """``build()``, and under ZeRO-3 inside ``deepspeed.zero.Init``: each module's parameters are cut into the
    ranks' partitions as soon as that module is made, so no rank ever holds the whole model.

    The weights equal an unpartitioned build's bitwise (same seed): module constructors initialise full tensors
    before they are cut, and zero.Init gathers each module's parameters around ``nn.Module.apply`` -- which is
    why the models set their own initial values only through ``self.apply(self.init_weights)``."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return build()
    import deepspeed

    # mem_efficient_linear would replace torch.nn.functional.linear for the whole process ("this will persist
    # unless manually reset"); PyTorch's own is what every other path of llmtrain runs (same losses either way).
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        return build()


def copy_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], zero_stage: int) -> None:
    """Copy ``weights`` (the same on every rank) into a freshly built ``model`` by parameter name (a tied head may be
    left out), one tensor at a time: a ``WeightSource`` (``llmtrain.weights``) reads each from its files only then,
    so a rank holds the model and one tensor besides. Under ZeRO-3 each rank reads only the elements of its own
    partition of each parameter (``partition_range``) and writes them straight into it."""
    source = weights if isinstance(weights, WeightSource) else TensorWeights(weights)
    params = dict(model.named_parameters())  # a tied weight appears once, under its first name
    missing = sorted(set(params) - set(source))
    if missing:
        raise UserError(f"the initial weights have no {', '.join(missing[:4])}")
    wrong = [f"{name} {tuple(source.shape(name))} (the model's: {tuple(getattr(param, 'ds_shape', param.shape))})"
             for name, param in params.items() if source.shape(name) != getattr(param, "ds_shape", param.shape)]
    if wrong:
        raise UserError(f"the initial weights do not fit the model: {', '.join(wrong[:3])}")
    for name, param in params.items():
        with torch.no_grad():
            if zero_stage == 3:
                _copy_partition(param, source, name)
            else:
                param.copy_(source[name])


def partition_range(numel: int, partition_size: int, rank: int) -> tuple[int, int]:
    """The first element and the number of elements of a parameter of ``numel`` elements that the ``rank``-th
    ZeRO-3 partition of ``partition_size`` holds (DeepSpeed's ``_partition_param``: the parameter flattened in
    row-major order, cut into equal partitions; the last one padded, past the end none)."""
    start = partition_size * rank
    return start, max(0, min(numel - start, partition_size))


def _copy_partition(param: torch.nn.Parameter, source: WeightSource, name: str) -> None:
    """Write this rank's elements of ``source[name]`` into the ZeRO-3 partition of ``param`` (its padding as it
    was). Partitions swapped out to NVMe are written as DeepSpeed writes a whole parameter: gathered, changed on
    rank 0, partitioned again."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import OffloadDeviceEnum

    partition = param.ds_tensor
    if getattr(partition, "final_location", None) == OffloadDeviceEnum.nvme:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.copy_(source[name])
        return
    rank = deepspeed.comm.get_rank(group=param.ds_process_group)
    start, count = partition_range(param.ds_numel, partition.ds_numel, rank)
    if count:
        partition.narrow(0, 0, count).copy_(source.flat(name, start, count))


def should_compile(setting: bool | None, device: torch.device, zero_stage: int, pipeline: bool = False) -> bool:
    """``train.compile``: as set, or (null) on with CUDA at ZeRO 0-2. Measured on 2 CPU cores (`small`, block 128,
    docs/benchmarks.md, torch.compile): fp32 steps are matmul-bound (85% of the step in matmul and attention kernels)
    and gain 1.01-1.05x; bf16 gains 1.17-1.24x after a first compile of ~13 s per process (~3 s from inductor's cache),
    which a short CPU run does not win back.

    ZeRO-3 gathers each submodule's parameters in hooks that plain torch.compile traces into, recompiling per
    submodule until dynamo gives up (measured: the recompile limit hit at the first step). DeepSpeed compiles
    ZeRO-3 through DeepCompile instead, which builds for CUDA only: asked for on a CPU, it is refused."""
    if pipeline:  # the pipeline engine runs its stages' modules itself, micro-batch by micro-batch
        if setting:
            raise AgreedError("train.compile=true does not combine with dist.pipeline_parallel>1 (DeepSpeed's "
                              "pipeline engine calls its stages itself); use train.compile=false")
        return False
    if setting is None:
        return device.type == "cuda" and zero_stage < 3
    if setting and zero_stage == 3 and device.type != "cuda":
        raise AgreedError("train.compile=true under ZeRO-3 needs DeepSpeed's DeepCompile, which runs on CUDA GPUs "
                          "only; on CPU use dist.zero_stage=0|1|2 or train.compile=false")
    return setting


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
               compile_model: bool = False, mpu: Any = None):
    """Wrap model and optimizer in a DeepSpeed engine (the only call of deepspeed.initialize, with the workarounds
    of ``llmtrain.workarounds`` that apply to this accelerator and ZeRO stage; ``mpu``: the sequence-parallel
    groups of ``llmtrain.distributed.parallel``, or None); with
    ``compile_model``, torch.compile the module in place through the engine (its parameter names, and so every
    checkpoint, stay those of the eager module: a run saved compiled resumes eager and back)."""
    import deepspeed  # imported on use: after select_accelerator, and not for --help
    from pydantic import ValidationError

    zero_stage = ds_config["zero_optimization"]["stage"]
    try:
        with workarounds.around_initialize(zero_stage):  # the patches of DeepSpeed that apply here, if any
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    except ValidationError as exc:  # a nested key of dist.deepspeed_overrides that DeepSpeed does not know
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise UserError(f"dist.deepspeed_overrides: DeepSpeed refused the config ({problems})") from None
    workarounds.after_initialize(engine, zero_stage)
    if compile_model:
        engine.compile()
    return engine


UNIVERSAL = "universal"
"""The sub-folder of a checkpoint that holds its universal form."""
CONVERTED = "converted.json"


def universal_checkpoint(folder: Path, note: dict[str, Any]) -> Path:
    """DeepSpeed's universal form of the ZeRO 1-3 checkpoint ``folder`` (``ds_to_universal``: each parameter's fp32
    weights and optimizer moments whole, tensor-parallel slices joined), which any world size and layout can
    load. Made once, in ``folder/universal``, and marked done by ``note`` (what it was converted from) written
    last. One process converts; the others wait for it."""
    universal = folder / UNIVERSAL
    if not (universal / CONVERTED).is_file():
        select_accelerator()
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(universal, ignore_errors=True)
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; our stdout is for results
            ds_to_universal(Namespace(input_folder=str(folder), output_folder=str(universal), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
        (universal / CONVERTED).write_text(json.dumps(note))
    return universal


def fp32_weights(folder: Path, zero_stage: int, model_cfg: ModelConfig, tensor_parallel: int = 1,
                 pipeline_parallel: int = 1) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed's files: ZeRO >= 1 merges the fp32 partitions of every rank (DeepSpeed's
    zero_to_fp32, or with tensor-parallel slices or pipeline stages its universal conversion); ZeRO-0 keeps whole
    weights (a pipeline's in one file per layer), and under bf16 their fp32 masters in the optimizer state."""
    if pipeline_parallel > 1:
        return _pipeline_weights(folder, model_cfg, pipeline_parallel)
    if any(folder.glob(EXPERT_FILES)):
        return _expert_parallel_weights(folder)
    if tensor_parallel > 1:
        if zero_stage == 0:
            raise UserError(f"{folder} was saved at ZeRO-0 with dist.tensor_parallel={tensor_parallel}, whose "
                            "slices DeepSpeed joins only from ZeRO 1-3 checkpoints; resume it with "
                            f"dist.tensor_parallel={tensor_parallel} and dist.zero_stage=1 to save one that exports")
        zero = universal_checkpoint(folder, {"tensor_parallel": tensor_parallel}) / "zero"
        return {path.name: torch.load(path / "fp32.pt", map_location="cpu", weights_only=False)["param"].float()
                for path in sorted(zero.iterdir()) if (path / "fp32.pt").is_file()}
    if zero_stage > 0:
        select_accelerator()  # before deepspeed is imported: no CUDA -> its CPU accelerator, without a warning
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # after select_accelerator

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout is for generated text
            weights = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        return {k: v.detach().clone() for k, v in weights.items()}
    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    weights = {k: v.float() for k, v in saved["module"].items()}
    masters = (saved.get("optimizer") or {}).get("fp32_groups")
    if masters is not None and any(v.dtype != torch.float32 for v in saved["module"].values()):
        # DeepSpeed keeps the fp32 masters per optimizer group: the group-order contract of llmtrain.optim.
        with torch.device("meta"):
            model = build_model(model_cfg)
        name_of = {id(p): n for n, p in model.named_parameters()}
        for group, group_masters in zip(param_groups(model.parameters(), 0.0), masters, strict=True):
            for param, master in zip(group["params"], group_masters, strict=True):
                weights[name_of[id(param)]] = master.float()
        if model_cfg.tie_embeddings:
            weights["lm_head.weight"] = weights["wte.weight"]
    return weights


EXPERT_FILES = "layer_*_expert_*_mp_rank_00_model_states.pt"
"""DeepSpeed's files of an expert-parallel checkpoint's experts: one per expert of each MoE layer, by global id."""


def _expert_parallel_weights(folder: Path) -> dict[str, torch.Tensor]:
    """An expert-parallel checkpoint's weights by the model's names (``experts.model_name``): the module's file
    (everything but the experts) and one file per expert. Trained in mixed precision, these are the module's bf16/fp16
    weights, the ones the model computed with (its fp32 masters are in per-rank optimizer partitions of DeepSpeed's
    expert groups, which llmtrain does not join): said in one log line."""
    from llmtrain.distributed.experts import model_name

    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for path in sorted(folder.glob(EXPERT_FILES)):
        saved.update(torch.load(path, map_location="cpu", weights_only=False))
    dtypes = {str(v.dtype).removeprefix("torch.") for v in saved.values()} - {"float32"}
    if dtypes:
        logging.getLogger("llmtrain").warning(
            "%s: an expert-parallel checkpoint trained in %s: its weights as the model computed with them, not its "
            "fp32 masters (DeepSpeed keeps those in per-rank expert partitions, which llmtrain does not join)",
            folder, "/".join(sorted(dtypes)))
    return {model_name(name): value.float() for name, value in saved.items()}


def _pipeline_weights(folder: Path, model_cfg: ModelConfig, stages: int) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint's fp32 weights by the model's names (``pipeline.model_name``): where it holds optimizer
    partitions (ZeRO-1, or bf16 masters) through DeepSpeed's universal conversion, which joins the stages; at ZeRO-0
    in fp32 from the per-layer files, whose keys are each layer holder's own."""
    from llmtrain.distributed.pipeline import model_name

    if any(folder.glob("*_optim_states.pt")):
        zero = universal_checkpoint(folder, {"pipeline_parallel": stages}) / "zero"
        return {model_name(path.name, model_cfg.n_layer):
                torch.load(path / "fp32.pt", map_location="cpu", weights_only=False)["param"].float()
                for path in sorted(zero.iterdir()) if (path / "fp32.pt").is_file()}
    weights = {}
    for path in sorted(folder.glob("layer_*-model_states.pt")):  # a layer's keys are its holder's: "{index}.{key}"
        index = int(path.name.split("-")[0].removeprefix("layer_"))
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            weights[model_name(f"{index}.{key}", model_cfg.n_layer)] = value.float()
    return weights
