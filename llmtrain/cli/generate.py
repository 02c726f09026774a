"""Sample text from a trained model: its run folder, one checkpoint (any ZeRO stage, any number of ranks), or an
exported folder. The generated text alone goes to stdout (streamed for a single prompt); logs go to stderr.

    llmtrain-generate run.dir=runs/demo prompt="def main(" seed=1 max_new_tokens=100
    llmtrain-generate run.dir=runs/demo prompts_file=prompts.txt temperature=0.8 top_p=0.95 batch_size=8
    llmtrain-generate run.dir=runs/demo prompt="import os" temperature=0      # greedy

A prompt that does not fit the context with max_new_tokens is cut from the left, with a warning.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from llmtrain.cli._entry import hydra_command
from llmtrain.config import GenerateConfig
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def read_prompts(cfg: GenerateConfig) -> list[str]:
    if not cfg.prompts_file:
        return [cfg.prompt]
    path = Path(cfg.prompts_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"prompts_file={path} could not be read as UTF-8 text ({exc})") from None
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompts_file={path} holds no prompt (one per line)")
    return prompts


def run(cfg: GenerateConfig) -> None:
    # Imported on use, not at the top: --help and config errors answer before torch is loaded.
    import torch

    from llmtrain.distributed.env import local_device
    from llmtrain.dtypes import torch_dtype
    from llmtrain.generate import TextGenerator
    from llmtrain.run.trained import load_trained

    prompts = read_prompts(cfg)
    trained = load_trained(cfg.run.dir, cfg.run.step, cfg.tokenizer or None)
    device = local_device(cfg.device.value)
    log.info("%s: %s model at step %d on %s", trained.source, trained.model_cfg.name, trained.step, device)
    generator = TextGenerator(trained.build(device, torch_dtype(cfg.dtype)), trained.tokenizer, device)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    torch.manual_seed(cfg.seed)
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start: start + cfg.batch_size]
        if cfg.echo_prompt and len(batch) == 1:
            write(batch[0])
        outputs = generator.generate(batch, cfg, cfg.seed + start, stream=write)
        for i, (prompt, text) in enumerate(zip(batch, outputs, strict=True)):
            if len(batch) > 1:
                write((prompt if cfg.echo_prompt else "") + text)
            if start + i < len(prompts) - 1:
                write("\n\n" + "-" * 40 + "\n\n")
    write("\n")


main = hydra_command("llmtrain-generate", "generate", GenerateConfig, run, verbatim=("prompt", "prompts_file"))

if __name__ == "__main__":
    main()
