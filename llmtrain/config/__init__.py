"""The typed configuration schema of llmtrain, one module per concern.

One dataclass per section, one root per entry point. Hydra composes YAML files from ``conf/`` onto these
schemas (``register_configs`` puts them in the ConfigStore); each CLI turns the result into these objects on
its first line, so code below ``llmtrain/cli`` never sees a ``DictConfig``.

Checks inside a section live in its ``__post_init__``; every problem is collected and raised as one
``ValueError`` that names the override to change. Nothing here probes hardware or touches the file system.

``checks`` holds the caps and range checks every section shares; ``data``, ``model``, ``loop`` (precision, optim,
train, wandb), ``layout`` (mode, dist) and ``ps`` one concern each; ``train`` and ``commands`` the roots of the
commands. Everything is re-exported here: ``from llmtrain.config import TrainConfig``.
"""

from __future__ import annotations

from llmtrain.config.checks import (
    MAX_CONTEXT,
    MAX_COUNT,
    MAX_LAYERS,
    MAX_SEED,
    MAX_TIMEOUT_S,
    MAX_VOCAB,
    MAX_WIDTH,
    bounded,
    bounded_each,
    nonempty,
    raise_problems,
    to_plain,
)
from llmtrain.config.commands import (
    Device,
    EvalConfig,
    ExportConfig,
    ExportFormat,
    GenerateConfig,
    NgramConfig,
    PrepareConfig,
    SamplingConfig,
    TrainedRef,
    WeightDtype,
)
from llmtrain.config.data import DataConfig, MixSource, Source, TextUnit, TokenizerType
from llmtrain.config.layout import DistConfig, Mode, parallel_problems
from llmtrain.config.loop import (
    AUTO,
    Decay,
    OptimConfig,
    OptimizerName,
    Precision,
    TrainLoopConfig,
    WandbConfig,
    WandbMode,
)
from llmtrain.config.model import MLP, Arch, ModelConfig, Norm, Positions
from llmtrain.config.ps import Algorithm, PSConfig, PushDtype, Transport
from llmtrain.config.train import CompareConfig, CompareSection, Resume, RunConfig, TrainConfig

__all__ = [
    "AUTO",
    "Algorithm",
    "Arch",
    "bounded",
    "bounded_each",
    "CompareConfig",
    "CompareSection",
    "DataConfig",
    "Decay",
    "Device",
    "DistConfig",
    "EvalConfig",
    "ExportConfig",
    "ExportFormat",
    "GenerateConfig",
    "MAX_CONTEXT",
    "MAX_COUNT",
    "MAX_LAYERS",
    "MAX_SEED",
    "MAX_TIMEOUT_S",
    "MAX_VOCAB",
    "MAX_WIDTH",
    "MixSource",
    "MLP",
    "Mode",
    "ModelConfig",
    "NgramConfig",
    "nonempty",
    "Norm",
    "OptimConfig",
    "OptimizerName",
    "parallel_problems",
    "Positions",
    "Precision",
    "PrepareConfig",
    "PSConfig",
    "PushDtype",
    "raise_problems",
    "register_configs",
    "Resume",
    "RunConfig",
    "SamplingConfig",
    "Source",
    "TextUnit",
    "to_plain",
    "TokenizerType",
    "TrainConfig",
    "TrainedRef",
    "TrainLoopConfig",
    "Transport",
    "WandbConfig",
    "WandbMode",
    "WeightDtype",
]


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; YAML files under ``conf/`` name them in ``defaults``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="ngram_schema", node=NgramConfig)
    cs.store(name="compare_schema", node=CompareConfig)
