"""The config the in-process helper scripts (nonfinite_run.py, step_probe.py, initial_weights_run.py) train with:
a 2-layer, 64-wide GPT, fp32 unless told, on a prepared data folder."""

from __future__ import annotations

from llmtrain.config import (
    DataConfig,
    DistConfig,
    ModelConfig,
    OptimConfig,
    Precision,
    RunConfig,
    TrainConfig,
    TrainLoopConfig,
)


def tiny_config(data_dir: str, run_dir: str, stage: int, precision: Precision = Precision.fp32,
                **train) -> TrainConfig:
    """``train``: TrainLoopConfig fields (max_steps, batch sizes, cadences, compile...)."""
    return TrainConfig(data=DataConfig(dir=data_dir), run=RunConfig(dir=run_dir), precision=precision,
                       model=ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
                       optim=OptimConfig(lr=3e-3, warmup_steps=2), dist=DistConfig(zero_stage=stage),
                       train=TrainLoopConfig(**train))
