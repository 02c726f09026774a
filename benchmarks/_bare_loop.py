"""The bare loop that bench_train.py holds llmtrain-train against: llmtrain's own GPT module, torch.optim.AdamW,
gradient accumulation and clipping, batches cut at random offsets of a prepared shard -- nothing else (no
DeepSpeed, no metrics, no checkpoints). Prints one JSON line: tokens/s over the steps after the first quarter.
Under torchrun the model is wrapped in torch's DistributedDataParallel (gloo on CPU): plain data parallelism,
the same global batch.

With --peer it is the simplest peer instead: the GPT-2 block stack of benchmarks/_peer_gpt.py (no llmtrain code)
of the preset's shape, with torch.optim.AdamW at its defaults (single-tensor on CPU, as a script gets it).

    python benchmarks/_bare_loop.py DATA_DIR --threads 2 --micro 8 --accum 2 --steps 24 [--block 128] [--compile]
    torchrun --standalone --nproc_per_node 2 benchmarks/_bare_loop.py DATA_DIR --threads 1 --accum 1
    python benchmarks/_bare_loop.py DATA_DIR --peer [--mlp gelu_exact]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _peer_gpt import PeerGPT  # benchmarks/ is on sys.path when a benchmark runs as a script
from omegaconf import OmegaConf

from llmtrain.config import MLP, ModelConfig
from llmtrain.data.shards import META_FILE
from llmtrain.model import build_model

REPO = Path(__file__).resolve().parents[1]



def train_shard(data: str | Path) -> np.memmap:
    """The first training shard of a prepared folder, memory-mapped."""
    meta = json.loads((Path(data) / META_FILE).read_text())
    return np.memmap(Path(data) / meta["splits"]["train"]["shards"][0]["file"], dtype=meta["dtype"], mode="r")


def random_batch(shard: np.memmap, block: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``micro`` windows of ``block`` + 1 tokens at random offsets: inputs and next-token targets."""
    starts = torch.randint(len(shard) - block - 1, (micro,)).tolist()
    rows = torch.from_numpy(np.stack([shard[s: s + block + 1].astype(np.int64) for s in starts]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def adamw(model: torch.nn.Module, foreach: bool | None, lr: float = 3e-4, weight_decay: float = 0.1,
          betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """torch AdamW, weight decay on matrices and embeddings only; ``foreach=None``: torch's default for the device."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, foreach=foreach)


def bare_step(model: torch.nn.Module, opt: torch.optim.Optimizer, next_batch: Callable[[], tuple], accum: int,
              clip: float, foreach: bool | None) -> torch.Tensor:
    """One optimizer step as a script writes it: accumulate, clip, step, zero. Returns the last micro-batch's loss
    (on the device: reading it back is the caller's choice)."""
    for _ in range(accum):
        _, loss = model(*next_batch())
        (loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=foreach)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--model", default="small", help="a conf/model preset")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peer", action="store_true", help="the peer's model and optimizer (see above)")
    parser.add_argument("--mlp", default="", help="model.mlp for both models (the peer: gelu | gelu_exact)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = json.loads((Path(args.data) / META_FILE).read_text())
    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml"))
    preset.pop("defaults", None)
    cfg = ModelConfig(**{**preset, "block_size": args.block, "vocab_size": meta["vocab_size"]})
    if args.mlp:
        cfg.mlp = MLP(args.mlp)
    shard = train_shard(args.data)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(1337)
    if args.peer:
        model = PeerGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                        exact_gelu=cfg.mlp == MLP.gelu_exact)
    else:
        model = build_model(cfg)
    if args.compile:
        model.compile()
    if world > 1:
        torch.distributed.init_process_group("gloo")
        torch.manual_seed(1337 + torch.distributed.get_rank())  # each rank its own batches
        model = torch.nn.parallel.DistributedDataParallel(model)
    foreach = None if args.peer else True
    opt = adamw(model, foreach)
    warm = max(1, args.steps // 4)
    start = 0.0
    for step in range(args.steps):
        if step == warm:
            start = time.perf_counter()
        loss = bare_step(model, opt, lambda: random_batch(shard, args.block, args.micro), args.accum, 1.0, foreach)
        if step % warm == 0:
            loss.item()  # what a loop prints now and then
    seconds = time.perf_counter() - start
    tokens = (args.steps - warm) * args.accum * args.micro * args.block * world
    if world == 1 or torch.distributed.get_rank() == 0:
        print(json.dumps({"tokens_per_s": tokens / seconds}))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
