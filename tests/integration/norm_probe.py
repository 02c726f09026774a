"""Helper process for test_parallel.py: train a few fp32 ZeRO-0 steps of a 2-layer GPT in the given layout, and
print, per step, the gradient norm llmtrain clips with and logs beside a float64 recomputation of the whole
gradient: every weight once (llmtrain's ``counted_gradients``: a tied copy on a later pipeline stage left out, a
tensor-parallel rank's whole weights counted on its group's first rank), each gradient element squared in float64,
summed over the ranks that hold different parts of the model.

    python tests/integration/norm_probe.py DATA_DIR RUN_DIR [PIPELINE TENSOR SEQUENCE]      (under torchrun)
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist
from tiny_config import tiny_config  # a sibling: a script run by path has its own folder on sys.path

import llmtrain.train.pipeline as pipeline_trainer
import llmtrain.train.trainer as plain_trainer
from llmtrain.cli.train import trainer_class
from llmtrain.distributed.deepspeed import counted_gradients
from llmtrain.distributed.exit import ended_process


def float64_norm(engine) -> float:
    """Each counted gradient element squared in float64 and summed, over the group (``counted_gradients``: which
    weights a rank counts is llmtrain's rule; the arithmetic here is the check's own)."""
    _, parts = counted_gradients(engine)
    whole = torch.zeros((), dtype=torch.float64)
    for counted, group in parts:
        total = torch.zeros((), dtype=torch.float64)
        for p in counted:
            total += p.grad.double().pow(2).sum()
        if group is not None:
            dist.all_reduce(total, group=group)
        whole += total
    return float(whole.sqrt())


def main() -> None:
    data_dir, run_dir = sys.argv[1], sys.argv[2]
    pp, tp, sp = (int(v) for v in (sys.argv[3:6] if len(sys.argv) > 3 else (1, 1, 1)))
    cfg = tiny_config(data_dir, run_dir, 0, max_steps=6, global_batch_size=8, micro_batch_size=2,
                      checkpoint_every=0, eval_every=0, log_every=1000)
    cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, pipeline_parallel=pp, tensor_parallel=tp,
                                                            sequence_parallel=sp))
    record = []
    clip = plain_trainer.clip_whole_gradients

    def recording_clip(engine, max_norm):
        reference = float64_norm(engine)
        ours = clip(engine, max_norm)
        record.append({"ours": float(ours), "float64": reference})
        return ours

    plain_trainer.clip_whole_gradients = pipeline_trainer.clip_whole_gradients = recording_clip
    trainer = trainer_class(cfg)(cfg)
    trainer.fit()
    if trainer.env.is_main:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    ended_process(main)()
