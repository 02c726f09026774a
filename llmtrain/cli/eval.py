"""Perplexity of a trained model on its dataset's validation windows, or on any text file, as a table.

    llmtrain-eval run.dir=runs/demo
    llmtrain-eval run.dir=runs/demo text_file=README.md
    llmtrain-eval run.dir=exports/demo data_dir=data/stdlib max_windows=200
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmtrain.cli._entry import hydra_command
from llmtrain.config import EvalConfig
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def run(cfg: EvalConfig) -> None:
    from llmtrain.data.reader import PreparedData
    from llmtrain.distributed.env import local_device
    from llmtrain.dtypes import torch_dtype
    from llmtrain.evaluate import mean_loss, perplexity, text_batches
    from llmtrain.export.consolidate import load_trained

    trained = load_trained(cfg.run.dir, cfg.run.step)
    device = local_device(cfg.device.value)
    model = trained.build(device, torch_dtype(cfg.dtype))
    block = trained.model_cfg.block_size
    if cfg.text_file:
        try:
            text = Path(cfg.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"text_file={cfg.text_file} could not be read as UTF-8 text ({exc})") from None
        batches = text_batches(trained.tokenizer, text, block, cfg.batch_size)
        if cfg.max_windows:
            batches = batches[: -(-cfg.max_windows // cfg.batch_size)]
        scored_on = cfg.text_file
    else:
        data_dir = cfg.data_dir or trained.data_dir
        if not data_dir:
            raise UserError(f"{trained.source} records no single dataset (an export, or a run on data.mix): add "
                            "data_dir=<a prepared folder> or text_file=<a text file>")
        data = PreparedData(data_dir)
        if data.tokenizer_fingerprint != trained.tokenizer.fingerprint:
            raise UserError(f"{data_dir} was tokenized with another tokenizer (sha256 "
                            f"{data.tokenizer_fingerprint[:12]}) than {trained.source} (sha256 "
                            f"{trained.tokenizer.fingerprint[:12]})")
        batches = data.val_windows(block, cfg.max_windows).batches(cfg.batch_size)
        scored_on = f"{data_dir} (val)"
    loss, tokens = mean_loss(model, batches, device)
    header = ("model", "step", "scored on", "tokens", "loss", "perplexity")
    row = (f"{trained.model_cfg.name} ({trained.model_cfg.arch.value})", str(trained.step), scored_on, f"{tokens:,}",
           f"{loss:.4f}", f"{perplexity(loss):.2f}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| " + " | ".join(row) + " |")


main = hydra_command("llmtrain-eval", "eval", EvalConfig, run, verbatim=("text_file",))

if __name__ == "__main__":
    main()
