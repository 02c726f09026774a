"""Helper process for test_train.py: train with a NaN loss injected at chosen steps; print a JSON report.

    python tests/integration/nonfinite_run.py DATA_DIR RUN_DIR ZERO_STAGE PRECISION
"""

from __future__ import annotations

import json
import sys

import torch
from tiny_config import tiny_config  # a sibling: a script run by path has its own folder on sys.path

from llmtrain.config import Precision
from llmtrain.distributed.exit import ended_process
from llmtrain.errors import UserError
from llmtrain.model.gpt import GPT
from llmtrain.train.trainer import Trainer

BAD_STEPS = {4, 5} | set(range(8, 100))  # 1-based optimizer steps whose loss is made NaN


def main() -> None:
    data_dir, run_dir, stage, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), Precision(sys.argv[4])
    cfg = tiny_config(data_dir, run_dir, stage, precision, max_steps=20, global_batch_size=8, micro_batch_size=4,
                      checkpoint_every=2, max_nonfinite_steps=3, eval_every=0, log_every=1)
    trainer = Trainer(cfg)
    forward = GPT.forward

    def nan_forward(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if targets is not None and self.training and trainer.step + 1 in BAD_STEPS:
            loss = loss * float("nan")
        return logits, loss

    GPT.forward = nan_forward
    record = []
    train_step = trainer.train_step

    def recording_step():
        before = [p.detach().clone() for p in trainer.engine.module.parameters()]
        out = train_step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters(), strict=True))
        record.append({"step": trainer.step + 1, "applied": out.applied, "unchanged": unchanged})
        return out

    trainer.train_step = recording_step
    error = None
    try:
        trainer.fit()
    except UserError as exc:
        error = str(exc)
    print(json.dumps({
        "skipped": [r["step"] for r in record if not r["applied"]],
        "weights_unchanged_by_skips": all(r["unchanged"] for r in record if not r["applied"])
        and not any(r["unchanged"] for r in record if r["applied"]),
        "error": error,
        "last_checkpoint": trainer.run.complete()[-1][0],
    }))


if __name__ == "__main__":
    ended_process(main)()  # as llmtrain-train ends (llmtrain/distributed/exit.py)
