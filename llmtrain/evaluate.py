"""Scoring a model on token windows: mean next-token cross-entropy and perplexity, on one process."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from llmtrain.data.reader import ValidationPart
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError


@torch.inference_mode()
def mean_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device) -> tuple[float, int]:
    """Mean cross-entropy over every target token of ``batches`` (x, y), and the number of targets."""
    total, count = 0.0, 0
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device))
        total += float(loss) * y.numel()
        count += y.numel()
    return total / max(count, 1), count


def text_batches(tokenizer: Tokenizer, text: str, block_size: int,
                 batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A text as one document (end-of-document first, as in training) cut into windows of block_size targets;
    the last, shorter window is scored too."""
    ids = torch.tensor([tokenizer.eod_id, *tokenizer.encode(text)])
    if len(ids) < 2:
        raise UserError("the text is empty: nothing to score")
    starts = list(range(0, len(ids) - 1, block_size))
    full = [s for s in starts if s + block_size + 1 <= len(ids)]
    batches = []
    for i in range(0, len(full), batch_size):
        windows = torch.stack([ids[s: s + block_size + 1] for s in full[i: i + batch_size]])
        batches.append((windows[:, :-1], windows[:, 1:]))
    if len(full) < len(starts):
        tail = ids[starts[-1]:]
        batches.append((tail[None, :-1], tail[None, 1:]))
    return batches


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def validation_scores(parts: list[ValidationPart], losses: list[float]) -> dict[str, float]:
    """What a training run logs of its validation: ``val_loss`` (the parts' losses, weighted), ``val_ppl``, and
    ``val_loss/<name>`` for each named part (each source of a mix)."""
    total = sum(part.weight * loss for part, loss in zip(parts, losses, strict=True))
    named = {f"val_loss/{part.name}": loss for part, loss in zip(parts, losses, strict=True) if part.name}
    return {"val_loss": total, "val_ppl": perplexity(total), **named}
