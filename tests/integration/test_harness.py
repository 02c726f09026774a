"""llmtrain-eval tasks=[...]: lm-evaluation-harness through our model, offline, on a local multiple-choice task
(tests/fixtures/lm_eval): its accuracy equals the same log-likelihood comparisons computed here by hand."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmtrain.run.trained import load_trained
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did

pytest.importorskip("lm_eval")
TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval"
RUN = ("z0-1rank", 1, "precision=fp32", "dist.zero_stage=0")  # shared with test_train / test_generate_export


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) summed over its tokens, written out without llmtrain.harness."""
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    ids = [tokenizer.eod_id, *context_ids, *continuation_ids]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0], dim=-1)
    first = len(ids) - 1 - len(continuation_ids)
    return sum(logprobs[first + j, t].item() for j, t in enumerate(continuation_ids))


def items() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "llmtrain_code_mc.jsonl").read_text().splitlines()]


def test_harness_requests_score_as_by_hand(run):
    from llmtrain.harness import HarnessLM

    trained = load_trained(run(*RUN))
    model = trained.build()
    lm = HarnessLM(model, trained.tokenizer, torch.device("cpu"), batch_size=4)
    pairs = [(item["context"], " " + choice) for item in items() for choice in item["choices"]]
    got = lm.loglikelihood([SimpleNamespace(args=pair) for pair in pairs])
    for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
        assert abs(logprob - hand_loglikelihood(model, trained.tokenizer, context, continuation)) < 1e-4
    text = "def f(x):\n    return x + 1\n"  # one window: the document's every token, after the eod id
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0]
    assert abs(rolling - hand_loglikelihood(model, trained.tokenizer, "", text)) < 1e-4

def test_offline_task_accuracy_equals_the_hand_computation(run, tmp_path):
    run_dir = run(*RUN)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | {"WANDB_DIR": str(tmp_path),
                                                                         "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli("llmtrain-eval", f"run.dir={run_dir}", "tasks=[llmtrain_code_mc]", f"task_dir={TASKS}",
                   "wandb.mode=offline", env=env, timeout=600)  # from the repository: the jsonl is found via task_dir
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if re.search(r"\|\s*acc\s*\|", line))
    harness_acc = float([cell for cell in row.split("|") if cell.strip()][-3])
    trained = load_trained(run_dir)
    model = trained.build()
    correct = 0
    for item in items():
        scores = [hand_loglikelihood(model, trained.tokenizer, item["context"], " " + c) for c in item["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
    hand_acc = correct / len(items())
    print(f"\nlm-eval acc {harness_acc} vs hand computation {hand_acc} ({correct}/{len(items())})")
    assert harness_acc == pytest.approx(hand_acc, abs=1e-4)
    assert list(tmp_path.glob("wandb/offline-run-*")), "the table was not logged to wandb (offline)"


def test_generation_tasks_and_unknown_tasks_are_one_line(run):
    proc = run_cli("llmtrain-eval", f"run.dir={run(*RUN)}", "tasks=[no_such_task_xyz]", f"task_dir={TASKS}")
    assert proc.returncode == 2 and "lm-eval knows no task no_such_task_xyz" in proc.stderr.splitlines()[-1]
