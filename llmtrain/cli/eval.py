"""Perplexity of a trained model on its dataset's validation windows or on any text file, as a table; or, with
tasks=[...], lm-evaluation-harness tasks (pip install 'llmtrain[eval]') through the model, its table printed.

    llmtrain-eval run.dir=runs/demo
    llmtrain-eval run.dir=runs/demo text_file=README.md
    llmtrain-eval run.dir=exports/demo data_dir=data/stdlib max_windows=200
    llmtrain-eval run.dir=runs/demo tasks=[arc_easy,hellaswag] limit=500 wandb.mode=offline
    llmtrain-eval run.dir=exports/demo tasks=[my_task] task_dir=tasks/   # a local task YAML over local files
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmtrain.cli._entry import hydra_command
from llmtrain.config import EvalConfig, WandbMode, to_plain
from llmtrain.errors import UserError

log = logging.getLogger("llmtrain")


def run(cfg: EvalConfig) -> None:
    # Imported on use, not at the top: --help and config errors answer before torch is loaded.
    from llmtrain.distributed.env import local_device
    from llmtrain.dtypes import torch_dtype
    from llmtrain.run.trained import load_trained

    if cfg.tasks:
        from llmtrain.harness import require_lm_eval

        require_lm_eval()  # before the model is loaded
    trained = load_trained(cfg.run.dir, cfg.run.step)
    device = local_device(cfg.device.value)
    model = trained.build(device, torch_dtype(cfg.dtype))
    if cfg.tasks:
        tasks_table(cfg, trained, model, device)
    else:
        perplexity_table(cfg, trained, model, device)


def tasks_table(cfg: EvalConfig, trained, model, device) -> None:
    # lm-eval is an optional extra (llmtrain[eval]): imported only when tasks are asked for.
    from lm_eval.utils import make_table

    from llmtrain.harness import HarnessLM, run_tasks

    results = run_tasks(HarnessLM(model, trained.tokenizer, device, cfg.batch_size), cfg.tasks, cfg.task_dir,
                        cfg.limit, cfg.num_fewshot)
    table = make_table(results)
    print(table)
    if cfg.wandb.mode != WandbMode.disabled:
        import wandb

        name = cfg.wandb.name or f"eval-{trained.source.name}"
        with wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=name, group=cfg.wandb.group,
                        mode=cfg.wandb.mode.value, job_type="eval", config=to_plain(cfg)) as started:
            scores = {f"{task}/{metric.split(',')[0]}": value for task, row in results["results"].items()
                      for metric, value in row.items() if isinstance(value, (int, float)) and "stderr" not in metric}
            started.log(scores)
            started.log({"lm_eval": wandb.Table(columns=["task", "metric", "value"],
                                                data=[[*key.split("/", 1), value] for key, value in scores.items()])})


def perplexity_table(cfg: EvalConfig, trained, model, device) -> None:
    # Imported on use, not at the top: --help and config errors answer before torch is loaded.
    from llmtrain.data.reader import PreparedData
    from llmtrain.data.tokenizer import check_same_tokenizer
    from llmtrain.evaluate import mean_loss, perplexity, text_batches

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
        check_same_tokenizer(data.tokenizer_fingerprint, trained.tokenizer.fingerprint, data_dir,
                             str(trained.source), "score it on data prepared with the model's tokenizer")
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
