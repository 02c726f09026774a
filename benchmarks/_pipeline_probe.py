"""Helper of bench_pipeline.py, run under torchrun: where a pipeline stage's step time goes.

    torchrun --standalone --nproc_per_node 2 benchmarks/_pipeline_probe.py DATA_DIR RUN_DIR SCHEDULE MICRO_BATCHES STEPS

`small` (6 blocks), fp32, block 128, micro-batch 2, ZeRO-0, dist.pipeline_parallel = the ranks, the given schedule
(1f1b | dualpipev) and micro-batches per step. Every instruction of DeepSpeed's pipeline schedule is timed as it
runs; rank 0 prints one JSON line per rank: the mean step time after the first, the time in forward and backward
passes, in the rest of the work (the optimizer step, the gradient reductions, loading micro-batches), and the wait:
the step less all of these (sends and receives that block, and the idle time between instructions).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch

from llmtrain.config import (
    DataConfig,
    DistConfig,
    OptimConfig,
    Precision,
    Resume,
    RunConfig,
    TrainConfig,
    TrainLoopConfig,
)
from llmtrain.distributed.env import init_distributed
from llmtrain.distributed.exit import ended_process
from llmtrain.train.pipeline import PipelineTrainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _memory_probe import preset  # noqa: E402

COMPUTE = {"ForwardPass", "BackwardPass"}
WAIT = {"SendActivation", "RecvActivation", "SendGrad", "RecvGrad", "CommitP2P"}


def main() -> None:
    data_dir, run_dir, schedule = sys.argv[1:4]
    micro_batches, steps = int(sys.argv[4]), int(sys.argv[5])
    env = init_distributed()
    cfg = TrainConfig(data=DataConfig(dir=data_dir), run=RunConfig(dir=run_dir, resume=Resume.restart),
                      model=preset("small", block_size=128), precision=Precision.fp32, optim=OptimConfig(),
                      dist=DistConfig(zero_stage=0, pipeline_parallel=env.world_size,
                                      pipeline_schedule=schedule),
                      train=TrainLoopConfig(max_steps=steps, global_batch_size=2 * micro_batches, micro_batch_size=2,
                                            eval_every=0, eval_windows=1, checkpoint_every=0))
    trainer = PipelineTrainer(cfg)
    spent: dict[str, float] = defaultdict(float)
    kind = type(trainer.engine)
    for instruction, run in list(kind._INSTRUCTION_MAP.items()):
        def timed(self, *args, _run=run, _name=instruction.__name__, **kwargs):
            start = time.perf_counter()
            try:
                return _run(self, *args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - start
        kind._INSTRUCTION_MAP[instruction] = timed
    rows = []
    for step in range(steps):
        spent.clear()
        start = time.perf_counter()
        trainer.train_step()
        trainer.step += 1
        total = time.perf_counter() - start
        if step:
            compute = sum(v for k, v in spent.items() if k in COMPUTE)
            other = sum(v for k, v in spent.items() if k not in COMPUTE | WAIT)
            rows.append({"step_s": total, "compute_s": compute, "other_s": other, "wait_s": total - compute - other})
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
    mine = {"rank": env.rank, "schedule": schedule, "micro_batches": micro_batches, **mean}
    every = [None] * env.world_size
    torch.distributed.all_gather_object(every, mine)
    if env.rank == 0:
        print("\n".join(json.dumps(row) for row in every), flush=True)


if __name__ == "__main__":
    ended_process(main)()
