"""Helper of bench_train.py, run under torchrun: the memory a rank holds, as the operating system counts it.

    torchrun --standalone --nproc_per_node 2 benchmarks/_memory_probe.py DATA_DIR RUN_DIR ZERO_STAGE MODEL STEPS [PP]

Rank 0 prints one JSON line per rank: its baseline (resident set size once PyTorch and DeepSpeed are loaded and the
process group is up, before any model), its peak resident set size (or CUDA's max_memory_allocated) after STEPS
training steps, the bytes of its parameter/gradient/optimizer-state tensors, the predicted peak, and s/step.
Settings: fp32, block 256, micro-batch 1, activation checkpointing (the issue's 350m measurement); PP pipeline stages
(default 1), the global batch one micro-batch per rank (under PP, PP micro-batches per step).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

from llmtrain.allocator import use_tuned_malloc
from llmtrain.cli.train import trainer_class
from llmtrain.config import (
    DataConfig,
    DistConfig,
    ModelConfig,
    Precision,
    Resume,
    RunConfig,
    TrainConfig,
    TrainLoopConfig,
)
from llmtrain.distributed import memory
from llmtrain.distributed.env import init_distributed
from llmtrain.distributed.exit import ended_process
from llmtrain.run.trained import model_config_from


def preset(name: str, **changes) -> ModelConfig:
    """conf/model/<name>.yaml, as ``model=<name>`` composes it."""
    plain = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "model" / f"{name}.yaml").read_text())
    plain.pop("defaults", None)
    return dataclasses.replace(model_config_from(plain), **changes)


def state_bytes(engine) -> int:
    """Bytes of the tensors the ZeRO formula counts: parameters (or their partitions), optimizer state."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().nbytes():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", p))
    wrapper = engine.optimizer
    opt = getattr(wrapper, "optimizer", wrapper)
    for t in getattr(wrapper, "fp32_partitioned_groups_flat", []) + getattr(wrapper, "single_partition_of_fp32_groups",
                                                                               []):
        add(t)
    for state in opt.state.values():
        for t in state.values():
            add(t)
    return sum(seen.values())


def main() -> None:
    data_dir, run_dir, stage, model, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    pp = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    env = init_distributed()
    baseline = memory.process_rss()
    cfg = TrainConfig(data=DataConfig(dir=data_dir), run=RunConfig(dir=run_dir, resume=Resume.restart),
                      model=preset(model, block_size=256),
                      dist=DistConfig(zero_stage=stage, activation_checkpointing=True, pipeline_parallel=pp),
                      precision=Precision.fp32,
                      train=TrainLoopConfig(max_steps=steps, global_batch_size=env.world_size, micro_batch_size=1,
                                            eval_every=0, eval_windows=1, checkpoint_every=0))
    trainer = trainer_class(cfg)(cfg)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    if env.device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(env.device))
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    psi = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    mine = {"rank": env.rank, "stage": stage, "world": env.world_size, "psi": psi, "baseline": baseline,
            "peak": peak, "states": state_bytes(trainer.engine), "predicted": trainer.predicted_memory.total,
            "step_s": min(times[1:] or times)}
    every = [None] * env.world_size
    torch.distributed.all_gather_object(every, mine)  # one writer: lines of two ranks would interleave
    if env.rank == 0:
        print("\n".join(json.dumps(row) for row in every), flush=True)


if __name__ == "__main__":
    use_tuned_malloc(int(sys.argv[3]))  # as llmtrain-train starts: from ZeRO-1 on, re-executed with glibc tuned
    ended_process(main)()  # and as it ends
