"""lm-evaluation-harness (``lm-eval``, an optional extra) over a trained model: ``llmtrain-eval tasks=...``.

``HarnessLM`` answers the harness's log-likelihood requests with our model and tokenizer; generation tasks are
refused. A request's context is scored as a document start ([eod] + its tokens, as llmtrain trains and generates),
and its continuation's tokens are those that encoding context + continuation adds after the context's own
(the harness's rule for HF models: a trailing space of the context moves to the continuation), so a token that
spans the boundary is scored as the text would be tokenized whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError

try:
    from lm_eval.api.model import LM
except ImportError:  # the CLI says how to install it; the module still imports
    LM = object


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context (after the end-of-document id) and of its continuation."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return [tokenizer.eod_id, *context_ids], whole[len(context_ids):]


class HarnessLM(LM):
    """Our model as an lm-eval ``LM``: loglikelihood and loglikelihood_rolling; generate_until is refused."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: torch.device, batch_size: int) -> None:
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self._device = device
        self.block_size = model.context_limit

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *request.args) for request in requests]
        return self.score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.tokenizer.eod_id, max_seq_len=self.block_size, context_len=1)]
            totals.append(sum(logprob for logprob, _ in self.score(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise UserError("tasks: generation tasks (output_type generate_until) are not supported; llmtrain-eval "
                        "runs log-likelihood tasks (multiple_choice, loglikelihood, loglikelihood_rolling)")

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether it is the greedy continuation) of each pair, in batches;
        a pair longer than block_size keeps its last block_size + 1 tokens."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start: start + self.batch_size]
            rows = [(context + continuation)[-(self.block_size + 1):] for context, continuation in batch]
            width = max(len(row) for row in rows) - 1
            idx = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: no real position sees it
            for i, row in enumerate(rows):
                idx[i, : len(row) - 1] = torch.tensor(row[:-1])
            logprobs = F.log_softmax(self.model(idx.to(self._device))[0].float(), dim=-1)  # (B, T, vocab)
            for i, ((_, continuation), row) in enumerate(zip(batch, rows, strict=True)):
                n = len(continuation)
                picked = logprobs[i, len(row) - 1 - n: len(row) - 1]  # (n, vocab): predictions of the continuation
                target = torch.tensor(continuation, device=picked.device)
                total = picked.gather(1, target[:, None]).sum().item()
                out.append((total, bool((picked.argmax(-1) == target).all())))
        return out


def run_tasks(lm: HarnessLM, tasks: list[str], task_dir: str, limit: int, num_fewshot: int | None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` (names; ``task_dir``: a folder of more task YAMLs). The tasks run
    from ``task_dir``, so the data files its YAMLs name by relative path are found beside them."""
    import contextlib

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = Path(task_dir).resolve() if task_dir else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"task_dir={task_dir} is not a folder")
    manager = TaskManager(include_path=str(folder) if folder else None)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise UserError(f"tasks: lm-eval knows no task {', '.join(unknown)}" +
                        ("" if task_dir else " (add task_dir=<folder of task YAMLs> for local tasks)"))
    with contextlib.chdir(folder) if folder else contextlib.nullcontext():
        return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit or None,
                               num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)


def require_lm_eval() -> None:
    if LM is object:
        raise UserError("tasks= needs lm-evaluation-harness: pip install 'llmtrain[eval]'")
