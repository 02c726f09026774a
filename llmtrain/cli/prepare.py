"""Prepare a corpus for training: train a sentencepiece tokenizer and pack the tokens into shards.

    llmtrain-prepare data=stdlib data.dir=data/stdlib
    llmtrain-prepare data=text 'data.paths=[corpus/]' data.vocab_size=16000 data.dir=data/mine
    llmtrain-prepare --cfg job          # print the composed config
"""

from __future__ import annotations

from llmtrain.cli._entry import hydra_command
from llmtrain.config import PrepareConfig


def run(cfg: PrepareConfig) -> None:
    from llmtrain.data.prepare import describe, prepare

    report = prepare(cfg.data)
    print(f"{report.data_dir}: {describe(report.meta)}")


main = hydra_command("llmtrain-prepare", "prepare", PrepareConfig, run)

if __name__ == "__main__":
    main()
