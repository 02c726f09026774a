"""Export a trained model: llmtrain's consolidated safetensors folder, or a folder transformers loads directly.

    llmtrain-export run.dir=runs/demo format=safetensors out=exports/demo
    llmtrain-export run.dir=runs/demo format=hf out=exports/demo-hf dtype=bf16   # pip install 'llmtrain[hf]'

Any checkpoint works (any ZeRO stage, saved by any number of ranks). format=hf writes GPT-2 for learned-position /
LayerNorm / GELU models and Llama for RoPE / RMSNorm / SwiGLU ones, with the tokenizer for AutoTokenizer.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from llmtrain.cli._entry import hydra_command
from llmtrain.config import ExportConfig, ExportFormat
from llmtrain.errors import UserError, os_reason

log = logging.getLogger("llmtrain")


def run(cfg: ExportConfig) -> None:
    # Imported on use, not at the top: --help and config errors answer before torch is loaded.
    from llmtrain.export.hf import save_hf
    from llmtrain.run.trained import load_trained, save_consolidated

    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise UserError(f"out={out} exists and is not empty; choose another folder or add overwrite=true")
    trained = load_trained(cfg.run.dir, cfg.run.step)
    # Write next to the destination, then move into place: an export that fails leaves no half folder.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:  # read-only, not a folder, no permission, ...
        raise UserError(f"cannot write out={out}: {os_reason(exc)}") from None
    try:
        if cfg.format == ExportFormat.hf:
            family = save_hf(trained, staging, cfg.dtype.value)
            what = f"transformers {family} folder"
        else:
            save_consolidated(trained, staging, cfg.dtype.value)
            what = "safetensors folder"
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except OSError as exc:  # a full disk or a lost mount while writing
        raise UserError(f"could not write out={out}: {os_reason(exc)}; nothing was left there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (step %d) as a %s", trained.source, trained.step, what)
    print(out)


main = hydra_command("llmtrain-export", "export", ExportConfig, run)

if __name__ == "__main__":
    main()
