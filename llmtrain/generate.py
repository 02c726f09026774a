"""Sampling from a trained model: greedy, temperature, top-k and top-p, incremental through the model's cache.

    llmtrain-generate run.dir=runs/demo prompt="def main(" seed=1 max_new_tokens=100

Every prompt starts a new document (it is preceded by the end-of-document token, as each document is in
training). Prompts of different lengths share a batch by left padding, which the model's cache masks out, so a
row's tokens are the same whether it is decoded alone or in a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from llmtrain.config import SamplingConfig
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with every token outside the top-k and outside the nucleus set to -inf.

    top-k keeps the k largest (ties at the k-th value are all kept). top-p keeps, in order of probability, each
    token whose preceding cumulative probability is below top_p: the smallest set whose mass reaches top_p.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        remove = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) chosen token ids."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class TextGenerator:
    """A model in eval mode with its tokenizer, on one device."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device

    def prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        """End-of-document then the prompt; cut from the left (with a warning) when it does not fit the context."""
        ids = [self.tokenizer.eod_id, *self.tokenizer.encode(prompt)]
        limit = self.model.context_limit
        if limit is not None:
            if max_new_tokens >= limit:
                raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                                f"context of {limit} tokens; use max_new_tokens <= {limit - 1}")
            room = limit - max_new_tokens
            if len(ids) > room:
                log.warning("prompt of %d tokens cut to its last %d: the context holds %d with %d new tokens",
                            len(ids), room, limit, max_new_tokens)
                ids = ids[-room:]
        return ids

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[list[int]], sampling: SamplingConfig, seed: int,
                     on_step: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
        """New token ids for each prompt (ids, already with EOD first); ``on_step`` sees each (B,) new column."""
        eod = self.tokenizer.eod_id
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        pad = width - lengths
        idx = torch.full((len(prompts), width), eod, dtype=torch.long, device=self.device)
        for row, ids in enumerate(prompts):
            idx[row, width - len(ids):] = torch.tensor(ids, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cache = self.model.new_cache(pad)
        logits, _ = self.model(idx, cache=cache)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        out: list[torch.Tensor] = []
        for _ in range(sampling.max_new_tokens):
            token = next_tokens(logits[:, -1], sampling, generator)
            token = token.masked_fill(done, eod)  # a finished row only repeats EOD, cut off below
            out.append(token)
            if on_step is not None:
                on_step(token)
            if sampling.stop_at_eod:
                done |= token == eod
                if bool(done.all()):
                    break
            if len(out) == sampling.max_new_tokens:
                break
            logits, _ = self.model(token[:, None], cache=cache)
        columns = torch.stack(out, dim=1).tolist()
        return [row[: row.index(eod)] if sampling.stop_at_eod and eod in row else row for row in columns]

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, seed: int,
                 stream: Callable[[str], None] | None = None) -> list[str]:
        """The continuation of each prompt. With one prompt, ``stream`` receives the text as it is produced."""
        ids = [self.prompt_ids(p, sampling.max_new_tokens) for p in prompts]
        on_step = None
        if stream is not None and len(prompts) == 1:
            on_step = _Streamer(self.tokenizer, stream, sampling.stop_at_eod)
        new = self.generate_ids(ids, sampling, seed, on_step)
        if on_step is not None:
            on_step.flush()
        return [self.tokenizer.decode(row) for row in new]


class _Streamer:
    """Decodes one row's tokens as they come and passes on the text that is final (no half UTF-8 character)."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None], stop_at_eod: bool) -> None:
        self.tokenizer, self.write, self.stop_at_eod = tokenizer, write, stop_at_eod
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    def __call__(self, token: torch.Tensor) -> None:
        if self.stopped:
            return
        tid = int(token[0])
        if self.stop_at_eod and tid == self.tokenizer.eod_id:
            self.stopped = True
            return
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # byte-fallback pieces of a character still arriving
            self.write(text[self.shown:])
            self.shown = len(text)

    def flush(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.write(text[self.shown:])
        self.shown = len(text)
