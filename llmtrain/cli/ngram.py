"""The n-gram baseline: an interpolated Kneser-Ney model fitted on a prepared dataset's training tokens, scored on
the same validation windows a model of the same block_size is scored on.

    llmtrain-ngram data.dir=data/stdlib order=3 block_size=128                      # the whole train split
    llmtrain-ngram data.dir=data/stdlib order=3 block_size=128 train_tokens=409600  # = the demo's token budget

With train_tokens=N it fits on exactly the windows a training run with the same seed and block_size reads in its
first N tokens (the reader's order does not depend on the world size), so it compares at equal training tokens.
A run with ``train.subset_tokens=N`` trains on those same first windows, several times over: the n-gram fitted
with train_tokens=N has the same training data (counts do not change with repetition, so it is fitted once).
"""

from __future__ import annotations

import logging
import math
import time

from llmtrain.cli._entry import hydra_command
from llmtrain.config import NgramConfig
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def run(cfg: NgramConfig) -> None:
    # Imported on use, not at the top: --help and config errors answer before torch is loaded.
    import numpy as np

    from llmtrain.baselines.ngram import KneserNeyLM
    from llmtrain.data.reader import PreparedData, windows_for

    data = PreparedData(cfg.data.dir)
    if data.vocab_size ** cfg.order >= 2 ** 63:  # the model's int64 n-gram keys (llmtrain/baselines/ngram.py)
        raise UserError(f"order={cfg.order} is too high for a vocabulary of {data.vocab_size:,}: vocab_size**order "
                        f"must stay below 2**63 (the highest order for it is {highest_order(data.vocab_size)})")
    train = data.split("train")
    if cfg.train_tokens:
        reader = data.train_reader(cfg.block_size, cfg.seed, rank=0, world_size=1)
        windows = reader.index.gather(reader.next_windows(windows_for(cfg.train_tokens, cfg.block_size)))
        sequences, fitted_on = list(windows), windows[:, 1:].size
    else:
        sequences, fitted_on = [np.asarray(s) for s in train.shards], train.num_tokens
    start = time.perf_counter()
    model = KneserNeyLM(cfg.order, data.vocab_size, cfg.discount or None).fit(sequences)
    log.info("fitted order %d on %s tokens in %.1f s (%s distinct n-grams per order)", cfg.order, f"{fitted_on:,}",
             time.perf_counter() - start, model.num_ngrams)
    val = data.val_windows(cfg.block_size, cfg.max_windows)
    windows = val.index.gather(val.windows)
    loss = -float(model.log_probs(windows).mean())
    header = ("model", "train tokens", "scored on", "tokens", "loss", "perplexity")
    row = (f"{cfg.order}-gram (interpolated Kneser-Ney)", f"{fitted_on:,}", f"{cfg.data.dir} (val)",
           f"{windows[:, 1:].size:,}", f"{loss:.4f}", f"{math.exp(loss):.2f}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| " + " | ".join(row) + " |")


def highest_order(vocab_size: int) -> int:
    order = 1
    while vocab_size ** (order + 1) < 2 ** 63:
        order += 1
    return order


main = hydra_command("llmtrain-ngram", "ngram", NgramConfig, run)

if __name__ == "__main__":
    main()
