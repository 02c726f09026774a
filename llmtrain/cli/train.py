"""Train a GPT under DeepSpeed ZeRO; re-running the same command resumes from the newest complete checkpoint.

    llmtrain-train data.dir=data/stdlib run.dir=runs/small model=small
    torchrun --nproc_per_node 2 -m llmtrain.cli.train data.dir=data/stdlib run.dir=runs/z2 dist.zero_stage=2
    deepspeed --num_gpus 8 -m llmtrain.cli.train data.dir=... run.dir=... model=gpt2-124m precision=bf16
    torchrun --nproc_per_node 3 -m llmtrain.cli.train ... mode=async_ps   # 1 server + 2 workers

A data.dir that holds no prepared dataset is refused, unless the source is named (data=stdlib|text|hf): then it is
prepared first from the data.* settings.
"""

from __future__ import annotations

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


# A rank leaves its process group and ends; over gloo without interpreter finalization (llmtrain/distributed/exit.py).
main = ended_process(hydra_command("llmtrain-train", "train", TrainConfig, run))

if __name__ == "__main__":
    main()
