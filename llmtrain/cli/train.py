"""Train a GPT under DeepSpeed ZeRO; re-running the same command resumes from the newest complete checkpoint.

    llmtrain-train data.dir=data/stdlib run.dir=runs/small model=small
    torchrun --nproc_per_node 2 -m llmtrain.cli.train data.dir=data/stdlib run.dir=runs/z2 dist.zero_stage=2
    deepspeed --num_gpus 8 -m llmtrain.cli.train data.dir=... run.dir=... model=gpt2-124m precision=bf16
    torchrun --nproc_per_node 3 -m llmtrain.cli.train ... mode=async_ps   # 1 server + 2 workers
    llmtrain-train --check --nproc_per_node 8 --nnodes 2 ...   # check a layout without starting it

--check [--nproc_per_node N] [--nnodes M|MIN:MAX] [--device-memory-gb G]: validate the config against that launch
(the data's vocabulary, model.init_from's shapes, every degree and batch size, the memory per rank) and print the
grid and predicted memory; exit 0, or 2 with one line. Nothing is started or written.

A data.dir that holds no prepared dataset is refused, unless the source is named (data=stdlib|text|hf): then it is
prepared first from the data.* settings.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from llmtrain.allocator import use_tuned_malloc
from llmtrain.cli._entry import hydra_command
from llmtrain.config import Mode, TrainConfig
from llmtrain.distributed.exit import ended_process


def trainer_class(cfg: TrainConfig) -> type:
    """The one place a training mode (and a layout with its own step driver) picks its trainer (imported on use:
    each mode loads only its own engine, DeepSpeed or torch.distributed.rpc, and only after ``use_tuned_malloc``)."""
    if cfg.mode == Mode.async_ps:
        from llmtrain.ps.trainer import AsyncPSTrainer

        return AsyncPSTrainer
    if cfg.dist.pipeline_parallel > 1:
        from llmtrain.train.pipeline import PipelineTrainer

        return PipelineTrainer
    from llmtrain.train.trainer import Trainer

    return Trainer


def run(cfg: TrainConfig) -> None:
    use_tuned_malloc(cfg.dist.zero_stage, cfg.dist.sequence_parallel)  # without a GPU, from ZeRO-1 on: re-executes once
    from llmtrain.run.rundir import RunDir  # after the re-execution: nothing heavy is imported twice

    run_dir = RunDir.of(cfg.run.dir)
    made_here = not run_dir.path.exists()
    trainer = None
    try:
        trainer = trainer_class(cfg)(cfg)
        result = trainer.fit()
    except BaseException:
        # A run refused during set-up, or failed before its first checkpoint, in a run.dir it made leaves no folder
        # behind that holds only its lock and resolved config (a folder that existed before is never removed).
        if made_here and (trainer is None or trainer.env.is_main):
            run_dir.remove_if_unused()
        raise
    if trainer.env.is_main and result.stopped_early:
        print(f"stopped at step {result.steps} with a checkpoint in {cfg.run.dir}; re-run to continue", flush=True)
    elif trainer.env.is_main:
        print(f"step {result.steps}: val_loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f}) vs unigram entropy "
              f"of the val tokens {result.unigram_entropy:.4f}; {result.skipped_steps} skipped step(s)", flush=True)


def check(launch) -> Callable[[TrainConfig], None]:
    """``--check``'s task: the layout's lines on stdout (a refusal is the command's one-line error)."""

    def task(cfg: TrainConfig) -> None:
        from llmtrain.run.check import check as check_layout

        print("\n".join(check_layout(cfg, launch)), flush=True)

    return task


# A rank leaves its process group and ends; over gloo without interpreter finalization (llmtrain/distributed/exit.py).
_train = ended_process(hydra_command("llmtrain-train", "train", TrainConfig, run))


def main() -> None:
    """``llmtrain-train``; with ``--check``, the layout check instead (its flags taken out before Hydra's)."""
    if "--check" not in sys.argv[1:]:
        return _train()
    from llmtrain.cli import _entry
    from llmtrain.errors import UserError
    from llmtrain.run.check import Launch

    try:
        launch, overrides = Launch.parse(sys.argv[1:])
    except UserError as exc:
        _entry.fail("llmtrain-train", str(exc))
    _entry.JOB_RANKS = launch.describe()
    sys.argv = [sys.argv[0], *overrides]
    return hydra_command("llmtrain-train", "train", TrainConfig, check(launch))()

if __name__ == "__main__":
    main()
