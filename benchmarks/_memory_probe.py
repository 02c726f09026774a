"""Helper of bench_train.py, run under torchrun: bytes of parameters, gradients and optimizer states per rank.

    torchrun --standalone --nproc_per_node 2 benchmarks/_memory_probe.py DATA_DIR RUN_DIR ZERO_STAGE

After one bf16 training step it sums every live tensor's storage (each storage once), split into the
engine's parameters (bf16 model weights), optimizer state (fp32 master copy, Adam moments) and the rest
(DeepSpeed's communication buffers; gradients live only inside a step), and prints one JSON line per rank.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings

import torch

from llmtrain.config import DataConfig, DistConfig, ModelConfig, OptimConfig, Precision, RunConfig, TrainConfig
from llmtrain.config import TrainLoopConfig as Loop
from llmtrain.train.trainer import Trainer


def storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def optimizer_tensors(wrapper) -> list[torch.Tensor]:
    """Adam moments and the fp32 master copy. ZeRO-3 takes its master partitions out of the inner
    optimizer's param_groups between steps; they live in fp32_partitioned_groups_flat."""
    opt = getattr(wrapper, "optimizer", wrapper)
    found = list(getattr(wrapper, "fp32_partitioned_groups_flat", []))
    for state in opt.state.values():
        found += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for group in opt.param_groups:  # the fp32 master partitions DeepSpeed hands to the inner optimizer
        found += [p for p in group["params"] if isinstance(p, torch.Tensor)]
    return found


def main() -> None:
    data_dir, run_dir, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = TrainConfig(data=DataConfig(dir=data_dir), run=RunConfig(dir=run_dir, resume=False),
                      model=ModelConfig(name="small", n_layer=6, n_head=6, n_embd=384, block_size=256),
                      optim=OptimConfig(), dist=DistConfig(zero_stage=stage), precision=Precision.bf16,
                      train=Loop(max_steps=1, global_batch_size=4, micro_batch_size=2, eval_every=0, eval_windows=1,
                                 checkpoint_every=0))
    trainer = Trainer(cfg)
    trainer.train_step()
    gc.collect()
    engine = trainer.engine
    params = storages(engine.module.parameters())
    optim = {k: v for k, v in storages(optimizer_tensors(engine.optimizer)).items() if k not in params}
    # ZeRO-3 keeps each rank's bf16 partition in ds_tensor, outside module.parameters()' (empty) storages
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            params.update(storages([p.ds_tensor]))
    with warnings.catch_warnings():  # gc walks into deprecated torch.distributed attributes
        warnings.simplefilter("ignore")
        everything = storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    rest = {k: v for k, v in everything.items() if k not in params and k not in optim}
    psi = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    print(json.dumps({"rank": trainer.env.rank, "stage": stage, "world": trainer.env.world_size, "psi": psi,
                      "params": sum(params.values()), "optim": sum(optim.values()), "rest": sum(rest.values())}),
          flush=True)


if __name__ == "__main__":
    main()
