"""Helper process for test_train.py: a Trainer's initial weights, gathered whole, and what each rank held.

    torchrun --nproc_per_node 2 tests/integration/initial_weights_run.py DATA_DIR RUN_DIR ZERO_STAGE OUT.pt [INIT_FROM]

Rank 0 saves {"weights": the gathered initial state, "model": the model config, "held": elements each rank held
right after construction, "read": elements each rank read from INIT_FROM's safetensors files a slice at a time,
"master_is_the_partition": per ZeRO-3 sub-group, whether the fp32 master partition shares the parameter partition's
storage}.
"""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch.distributed as dist
from tiny_config import tiny_config  # a sibling: a script run by path has its own folder on sys.path

from llmtrain.distributed import deepspeed as ds
from llmtrain.distributed.exit import ended_process
from llmtrain.train import trainer as trainer_module
from llmtrain.weights import SafetensorsWeights


def main() -> None:
    data_dir, run_dir, stage, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    held = []

    def counting(*args, **kwargs):  # what this rank holds once the model is built, before DeepSpeed wraps it
        model = ds.build_partitioned(*args, **kwargs)
        held.append(sum(getattr(p, "ds_tensor", p).numel() + (p.numel() if hasattr(p, "ds_tensor") else 0)
                        for p in model.parameters()))
        return model

    trainer_module.build_partitioned = counting
    read = [0]
    read_rows = SafetensorsWeights._read_rows

    def counting_reads(self, name, r0, r1):  # what this rank reads from the files of model.init_from
        rows = read_rows(self, name, r0, r1)
        read[0] += rows.numel()
        return rows

    SafetensorsWeights._read_rows = counting_reads
    cfg = tiny_config(data_dir, run_dir, stage, max_steps=1, global_batch_size=4, micro_batch_size=2, eval_every=0)
    if len(sys.argv) > 5:
        cfg.model.init_from = sys.argv[5]
    trainer = trainer_module.Trainer(cfg)
    params = list(trainer.engine.module.parameters())
    counts = [torch.zeros(2, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([held[0], read[0]]))
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        weights = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    zero = trainer.engine.optimizer  # under ZeRO-3: is each fp32 master partition the parameter partition itself?
    shared = [a.data_ptr() == b.data_ptr() for a, b in zip(getattr(zero, "fp16_partitioned_groups_flat", []),
                                                          getattr(zero, "fp32_partitioned_groups_flat", []),
                                                          strict=True)]
    if dist.get_rank() == 0:
        torch.save({"weights": weights, "model": trainer.model_cfg, "held": [int(c[0]) for c in counts],
                    "read": [int(c[1]) for c in counts],
                    "master_is_the_partition": shared}, out)
    dist.barrier()


if __name__ == "__main__":
    ended_process(main)()  # as llmtrain-train ends (llmtrain/distributed/exit.py)
