"""The recurrent baseline: embedding -> multi-layer LSTM -> dropout -> linear head (Zaremba et al. 2014 style).

Architecture only, like ``gpt.py``, and with the same interface, so the same trainer, checkpoints and generator
serve both: ``forward(idx, targets, cache)``, ``num_params``, ``flops_per_token``, ``new_cache``.
Fields of ``ModelConfig`` it uses: n_layer, n_embd (embedding and hidden width), dropout, tie_embeddings;
block_size is only the training window (the recurrence itself has no context limit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmtrain.config import ModelConfig


class LSTMState:
    """The recurrent state (h, c) of a generation batch; row b starts with pad[b] padding tokens."""

    def __init__(self, pad: torch.Tensor) -> None:
        self.pad = pad
        self.hc: tuple[torch.Tensor, torch.Tensor] | None = None


class LSTMLM(nn.Module):
    def __init__(self, cfg: ModelConfig, initialize: bool = True) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (from the dataset) before building the model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_embd, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.activation_checkpointing = False
        """Accepted from build_model; the LSTM does not recompute activations."""
        if initialize:  # else the weights are copied in next (model.init_from)
            self.apply(self.init_weights)

    def init_weights(self, module: nn.Module) -> None:
        """The initial values of ``module``'s own parameters, set only through ``self.apply``: a partitioned build
        gathers each module's parameters around it (see distributed.deepspeed.build_partitioned).

        Embedding and head uniform in +-0.1, as in PyTorch's word_language_model example (Zaremba et al. 2014):
        GPT's N(0, 0.02) leaves the LSTM's inputs too small to learn from quickly (no norm layer rescales them).
        nn.LSTM's own init (uniform +-1/sqrt(hidden)) is the usual one; forget-gate bias 1 helps early training."""
        if module is self.wte or (module is self.lm_head and not self.cfg.tie_embeddings):
            nn.init.uniform_(module.weight, -0.1, 0.1)
        elif module is self.lstm:
            for name, param in module.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        param[self.cfg.n_embd: 2 * self.cfg.n_embd].fill_(1.0)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: LSTMState | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, vocab) and, with targets, the mean cross-entropy; a cache carries (h, c)."""
        x = self.drop(self.wte(idx))  # (B, T, C)
        if cache is None:
            out, _ = self.lstm(x)
        elif cache.hc is None and bool(cache.pad.any()):
            out = self._prefill_padded(x, cache)
        else:
            out, cache.hc = self.lstm(x, cache.hc)
        logits = self.lm_head(self.drop(out))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def _prefill_padded(self, x: torch.Tensor, cache: LSTMState) -> torch.Tensor:
        """First call on a left-padded batch: run each row over its real tokens only (a packed sequence), so its
        state equals that of the row decoded alone. Outputs come back in the left-padded layout."""
        B, T, _ = x.shape
        shift = (torch.arange(T, device=x.device)[None, :] + cache.pad[:, None]) % T  # (B, T): left-align rows
        left = x.gather(1, shift[..., None].expand_as(x))
        lengths = (T - cache.pad).cpu()
        packed, cache.hc = self.lstm(pack_padded_sequence(left, lengths, batch_first=True, enforce_sorted=False))
        out, _ = pad_packed_sequence(packed, batch_first=True, total_length=T)
        unshift = (torch.arange(T, device=x.device)[None, :] - cache.pad[:, None]) % T
        return out.gather(1, unshift[..., None].expand_as(out))

    @property
    def context_limit(self) -> None:
        """No limit: the state carries the whole past."""
        return None

    def new_cache(self, pad: torch.Tensor) -> LSTMState:
        return LSTMState(pad)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the token table when it is not tied to the head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.cfg.tie_embeddings:
            n -= self.wte.weight.numel()
        return n

    def active_params(self) -> int:
        """Non-embedding parameters one token computes with: all of them."""
        return self.num_params()

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6N (forward + backward matmuls with every weight; the tied head is in N)."""
        return 6 * self.num_params()
