"""Prepare a corpus for training: train a sentencepiece tokenizer and pack the tokens into shards.

    llmtrain-prepare data=stdlib data.dir=data/stdlib
    llmtrain-prepare data=text 'data.paths=[corpus/]' data.vocab_size=16000 data.dir=data/mine
    llmtrain-prepare data=text 'data.paths=[big.jsonl]' data.streaming=true data.dir=data/big   # bounded memory
    llmtrain-prepare data.dir=data/stdlib data.num_tasks=4 data.task=plan   # then data.task=0..3, then merge:
    bash slurm/prepare.sh 4 data=stdlib data.dir=data/stdlib                # ... as a Slurm array
    llmtrain-prepare data.dir=data/stdlib verify=true   # prepare nothing: check every shard against meta.json
    llmtrain-prepare --cfg job          # print the composed config
"""

from __future__ import annotations

from llmtrain.cli._entry import hydra_command
from llmtrain.config import PrepareConfig


def run(cfg: PrepareConfig) -> None:
    # Imported on use, not at the top: --help and config errors answer before torch is loaded.
    if cfg.verify:
        from llmtrain.data.reader import PreparedData

        for report in PreparedData(cfg.data.dir).verify(show_progress=True):
            print(report.line())
        return
    from llmtrain.data.prepare import prepare

    print(prepare(cfg.data).line())


main = hydra_command("llmtrain-prepare", "prepare", PrepareConfig, run)

if __name__ == "__main__":
    main()
