"""Helper process for test_step.py: train a few steps in one process and print a JSON report of what each step did.

    python tests/integration/step_probe.py DATA_DIR RUN_DIR ZERO_STAGE COMPILE STEPS

Per optimizer step: the loss, the reads of a tensor's value back to the host (``item``, ``tolist``, ``float()``
...: on a GPU each waits for the device) by the package whose code asked (llmtrain, deepspeed, torch -- torch's
are AdamW's reads of its step counters, CPU tensors on a GPU too), and dynamo's count of compiled graphs after the
step.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from tiny_config import tiny_config  # a sibling: a script run by path has its own folder on sys.path
from torch.overrides import TorchFunctionMode

from llmtrain.distributed.exit import ended_process
from llmtrain.train.trainer import Trainer

READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"}
PACKAGES = {"llmtrain": str(Path(__file__).resolve().parents[2] / "llmtrain"), "deepspeed": "/deepspeed/",
            "torch": "/torch/"}


class HostReads(TorchFunctionMode):
    """Counts tensor reads back to the host by the package of the frame that asked."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict.fromkeys([*PACKAGES, "other"], 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            caller = traceback.extract_stack(limit=2)[0].filename
            self.counts[next((name for name, part in PACKAGES.items() if part in caller), "other")] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    data_dir, run_dir, stage, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
    compiled = sys.argv[4] == "true"
    cfg = tiny_config(data_dir, run_dir, stage, max_steps=steps, global_batch_size=8, micro_batch_size=4,
                      checkpoint_every=0, eval_every=0, log_every=1000, compile=compiled)
    trainer = Trainer(cfg)
    from torch._dynamo.utils import counters

    record = []
    train_step = trainer.train_step

    def recording_step():
        with HostReads() as reads:
            out = train_step()
        record.append({"step": trainer.step + 1, "loss": out.loss, "reads": reads.counts,
                       "graphs": counters["stats"]["unique_graphs"]})
        return out

    trainer.train_step = recording_step
    trainer.fit()
    names = list(torch.load(trainer.run.complete()[-1][1] / "mp_rank_00_model_states.pt", weights_only=False)
                 ["module"]) if stage < 3 else []
    if trainer.env.is_main:  # one line on stdout: two ranks' prints share torchrun's stdout and may interleave
        print(json.dumps({"steps": record, "saved_names": names}), flush=True)


if __name__ == "__main__":
    ended_process(main)()  # as llmtrain-train ends (llmtrain/distributed/exit.py)
