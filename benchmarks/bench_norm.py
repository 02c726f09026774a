"""What llmtrain's one gradient norm costs a step, against torch's clip_grad_norm_ (fp32 foreach), in one run.

    .venv/bin/python benchmarks/bench_norm.py       # ~1 minute on 2 cores

For the gradients of `small` and `350m` (random values in the models' parameter shapes, fp32): the seconds of a
norm-and-clip of each kind, interleaved A/B, the median of 20; each norm's relative error against float64; and for
scale a ZeRO-0 `small` training step's seconds (fp32, block 128, micro-batch 8 x 2 accumulation; measured by
bench_train.py's overhead table, not here).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory_probe import preset  # noqa: E402
from _table import table  # noqa: E402

from llmtrain.model import build_model  # noqa: E402
from llmtrain.optim import clip_grads_, grad_norm  # noqa: E402


def main() -> None:
    rows = []
    for name in ("small", "350m"):
        torch.manual_seed(0)
        with torch.device("meta"):
            shapes = [p.shape for p in build_model(preset(name, vocab_size=8192)).parameters()]
        params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
        for p in params:
            p.grad = torch.randn(p.shape) * 1e-3
        grads = [p.grad for p in params]
        exact = float(sum(g.double().pow(2).sum() for g in grads).sqrt())
        ours, theirs = [], []
        for _ in range(20):
            start = time.perf_counter()
            norm = grad_norm(grads)
            clip_grads_(grads, 1e9, norm)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch_norm = torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
            theirs.append(time.perf_counter() - start)
        rows.append([name, f"{sum(g.numel() for g in grads) / 1e6:.1f}M", f"{statistics.median(ours) * 1e3:.1f}",
                     f"{statistics.median(theirs) * 1e3:.1f}", f"{abs(float(norm) - exact) / exact:.1e}",
                     f"{abs(float(torch_norm) - exact) / exact:.1e}"])
    table("norm and clip of a whole fp32 gradient, ms (median of 20, interleaved); relative error against float64",
          ["model", "parameters", "llmtrain grad_norm", "torch clip_grad_norm_", "llmtrain error", "torch error"],
          rows)


if __name__ == "__main__":
    main()
