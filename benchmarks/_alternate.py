"""llmtrain's training step against the simplest peer's, alternated step by step in the same process(es), so that a
drift in machine speed (other work on shared cores) hits both alike. Prints one JSON line: the median times and the
median and mean of the per-pair speed ratios (ours / peer: above 1 is faster).

Ours is ``Trainer.train_step`` (the DeepSpeed engine, the trainer's clipping, its one read-back per step) built from
the llmtrain-train overrides given after ``--``; the peer is benchmarks/_peer_gpt.py with torch.optim.AdamW at its
defaults, clipping and accumulation as a script writes them, wrapped in torch DDP over the same ranks under torchrun.

    python benchmarks/_alternate.py --steps 30 -- data.dir=data/stdlib model=small model.block_size=128 ...
    torchrun --standalone --nproc_per_node 2 benchmarks/_alternate.py -- ... dist.zero_stage=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from _bare_loop import adamw, bare_step, random_batch, train_shard  # benchmarks/ is on sys.path as a script
from _peer_gpt import PeerGPT

from llmtrain.config import MLP, TrainConfig, register_configs


def compose(overrides: list[str]) -> TrainConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmtrain.cli._entry import CONF_DIR, to_typed

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="alternate"):
        return to_typed(hydra_compose(config_name="train", overrides=overrides), TrainConfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="pairs of steps; the first 4 are left out")
    parser.add_argument("overrides", nargs="*", help="llmtrain-train overrides (run.dir defaults to a temporary one)")
    args = parser.parse_args()
    from llmtrain.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="alternate-") as tmp:
        cfg = compose([f"run.dir={tmp}/run", "train.checkpoint_every=0", *args.overrides])
        cfg.train.max_steps = args.steps + 1  # lr schedule over the steps taken here
        trainer = Trainer(cfg)
        world = trainer.env.world_size
        model_cfg, accum, micro = trainer.model_cfg, trainer.grad_accum, cfg.train.micro_batch_size
        torch.manual_seed(1337 + trainer.env.rank)
        peer = PeerGPT(model_cfg.vocab_size, model_cfg.block_size, model_cfg.n_layer, model_cfg.n_head,
                       model_cfg.n_embd, exact_gelu=model_cfg.mlp == MLP.gelu_exact)
        device = trainer.engine.device
        peer = peer.to(device)
        if world > 1:
            peer = torch.nn.parallel.DistributedDataParallel(peer)
        opt = adamw(peer, None, cfg.optim.lr, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
        shard = train_shard(cfg.data.dir)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            x, y = random_batch(shard, model_cfg.block_size, micro)
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        mine, theirs = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            mine.append(time.perf_counter() - start)
            start = time.perf_counter()
            # .item() waits for the device, as the trainer's one read-back per step does
            bare_step(peer, opt, next_batch, accum, cfg.optim.grad_clip, None).item()
            theirs.append(time.perf_counter() - start)
        mine, theirs = mine[4:], theirs[4:]
        ratios = [b / a for a, b in zip(mine, theirs, strict=True)]
        if trainer.env.is_main:
            print(json.dumps({"ours_ms": 1000 * statistics.median(mine), "peer_ms": 1000 * statistics.median(theirs),
                              "median_ratio": statistics.median(ratios), "mean_ratio": statistics.fmean(ratios),
                              "ratio_of_sums": sum(theirs) / sum(mine), "world": world}), flush=True)


if __name__ == "__main__":
    main()
