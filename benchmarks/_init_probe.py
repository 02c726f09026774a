"""Helper of bench_init.py, run under torchrun: the memory model.init_from adds to a rank at start-up, ZeRO-3 fp32.

    torchrun --standalone --nproc_per_node 2 benchmarks/_init_probe.py FOLDER whole|sliced|none

What the synchronous trainer does with model.init_from, in its order: open the model (``whole``: ``load_trained``,
every tensor loaded first, as pickled weights still are; ``sliced``: ``open_trained``, the weights left in the
safetensors files), build it partitioned inside ``deepspeed.zero.Init``, copy the weights in (``copy_weights``).
``none`` builds the same model without model.init_from (its random initial weights): the floor of the other two.
Rank 0 prints one JSON line per rank: the resident set size right before (PyTorch, DeepSpeed and transformers'
Llama code loaded, the process group up), the peak resident set size during those three steps (VmHWM, reset right
before), the bytes of this rank's partitions, of the largest single tensor of the model, and the seconds taken.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

from llmtrain.allocator import use_tuned_malloc
from llmtrain.config import DataConfig, DistConfig, Precision, RunConfig, TrainConfig, TrainLoopConfig
from llmtrain.distributed import memory
from llmtrain.distributed.deepspeed import build_ds_config, build_partitioned, copy_weights
from llmtrain.distributed.env import init_distributed
from llmtrain.distributed.exit import ended_process
from llmtrain.hf_mapping import model_config_of
from llmtrain.model import build_model
from llmtrain.run.trained import load_trained, open_trained


def peak_rss() -> float:
    """The highest resident set size since the last ``reset_peak`` (VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return float(line.split()[1]) * 1024


def reset_peak() -> None:
    """Start VmHWM again from the current resident set size (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def main() -> None:
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (code the whole load imports, not counted)

    folder, path = Path(sys.argv[1]), sys.argv[2]
    env = init_distributed()
    model_cfg = model_config_of(transformers.AutoConfig.from_pretrained(folder), folder)  # its config.json only
    cfg = TrainConfig(data=DataConfig(dir=str(folder)), run=RunConfig(dir=str(folder)), model=model_cfg,
                      dist=DistConfig(zero_stage=3), precision=Precision.fp32,
                      train=TrainLoopConfig(global_batch_size=env.world_size, micro_batch_size=1))
    ds_config = build_ds_config(cfg, env.world_size)
    gc.collect()
    before = memory.process_rss()
    reset_peak()
    start = time.perf_counter()
    initial = {"sliced": open_trained, "whole": load_trained}.get(path, lambda _: None)(folder)
    model = build_partitioned(lambda: build_model(model_cfg, initialize=initial is None), ds_config)
    if initial is not None:
        copy_weights(model, initial.state_dict, zero_stage=3)
        del initial  # as the trainer drops it
    seconds = time.perf_counter() - start
    peak = peak_rss()
    params = list(model.parameters())
    mine = {"rank": env.rank, "path": path, "params": sum(p.ds_numel for p in params), "before": before,
            "added": peak - before, "partition": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
            "largest": max(p.ds_numel * p.ds_tensor.element_size() for p in params), "seconds": seconds}
    every = [None] * env.world_size
    torch.distributed.all_gather_object(every, mine)  # one writer: lines of two ranks would interleave
    if env.rank == 0:
        print("\n".join(json.dumps(row) for row in every), flush=True)


if __name__ == "__main__":
    use_tuned_malloc(3)  # as llmtrain-train starts at ZeRO-3: re-executed with glibc tuned
    ended_process(main)()  # and as it ends
