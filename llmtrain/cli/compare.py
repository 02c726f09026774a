"""Run sync ZeRO and async parameter servers side by side on the same model, data, token budget and number of
compute ranks; write loss vs tokens and vs wall-clock plots, the staleness histogram and a table.

    llmtrain-compare experiment=demo compare.dir=runs/compare
    llmtrain-compare experiment=demo compare.dir=runs/compare compare.compute_ranks=2 compare.staleness_lr=false

Every other override is passed to each training run (which resumes, like any run, if its folder holds one).
"""

from __future__ import annotations

from llmtrain.cli._entry import hydra_command
from llmtrain.config import CompareConfig


def run(cfg: CompareConfig) -> None:
    # Imported on use, not at the top: --help and config errors answer before torch is loaded.
    from hydra.core.hydra_config import HydraConfig

    from llmtrain.compare import compare

    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("compare.")]
    print(compare(cfg, overrides), flush=True)


main = hydra_command("llmtrain-compare", "compare", CompareConfig, run)

if __name__ == "__main__":
    main()
