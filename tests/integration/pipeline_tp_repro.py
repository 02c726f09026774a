"""The minimal reproduction behind llmtrain's refusal of dist.pipeline_parallel with dist.tensor_parallel: DeepSpeed's
pipeline module of llmtrain's GPT on 2 stages x 2 tensor-parallel ranks, split by AutoTP with llmtrain's partition
config, one train_batch. With DeepSpeed 0.19 initialize fails: AutoTP lays out its own groups over all ranks, so the
engine's start-up broadcast mixes the stages' parameters (gloo: "op.preamble.length <= op.nbytes. 8192 vs 256").
Exits 0 when the step trains.

    torchrun --nproc_per_node 4 tests/integration/pipeline_tp_repro.py
"""

from __future__ import annotations

import math
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # noqa: E402

from llmtrain.config import ModelConfig  # noqa: E402
from llmtrain.distributed.parallel import tensor_parallel_section  # noqa: E402
from llmtrain.distributed.pipeline import build_pipeline  # noqa: E402


def main() -> None:
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=512)
    deepspeed.init_distributed("gloo")
    module = build_pipeline(cfg, "type:Block", False, PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1),
                            False)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
              "zero_optimization": {"stage": 1}, "steps_per_print": 1 << 30,
              "tensor_parallel": tensor_parallel_section(cfg, 2)}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters()), config=config)
    torch.manual_seed(0)
    batches = [(torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))) for _ in range(2)]
    assert math.isfinite(float(engine.train_batch(iter(batches))))


if __name__ == "__main__":
    main()
