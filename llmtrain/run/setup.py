"""What every training mode sets up the same way: the data, the model config, the resolved config, the loss to
beat, the resume rule and the result. The synchronous trainer and the parameter-server trainer both call these
functions (their loops differ, so they share components, not a base class).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from llmtrain.config import DataConfig, ModelConfig, TrainConfig, to_plain
from llmtrain.data.mixture import MixedData, TrainingData
from llmtrain.data.reader import PreparedData
from llmtrain.data.shards import read_meta
from llmtrain.data.tokenizer import check_same_tokenizer
from llmtrain.errors import UserError, os_reason
from llmtrain.run import lock
from llmtrain.run.rundir import RunDir
from llmtrain.run.trained import TrainedModel, open_trained

log = logging.getLogger("llmtrain")


@dataclass
class TrainResult:
    """What a trainer's ``fit`` returns: per-step losses of this invocation and the final validation numbers."""

    losses: dict[int, float] = field(default_factory=dict)
    val_loss: float = float("nan")
    val_ppl: float = float("nan")
    unigram_entropy: float = float("nan")
    steps: int = 0
    skipped_steps: int = 0
    stopped_early: bool = False


@dataclass
class RunSetup:
    """What a trainer starts from: its run folder, the opened data, the model config and the resolved config."""

    run: RunDir
    data: TrainingData
    model_cfg: ModelConfig
    resolved: dict[str, Any]
    initial: TrainedModel | None = None
    """The model of model.init_from (its weights by our names, read from its files when copied: see
    ``open_trained``), or None: trainers copy it into the model they build
    (``llmtrain.distributed.deepspeed.copy_weights``)."""


def set_up_run(cfg: TrainConfig, is_main: bool, wait: Callable[[], None] | None = None) -> RunSetup:
    """The set-up every mode begins with, in this order: the run folder (made and locked by the main process;
    the same path on every rank), the data (prepared first if missing, see ``open_data``; its shards' sizes checked,
    and with data.verify=true every byte), the model config with its vocabulary check (or the model of
    ``model.init_from``, with its tokenizer check), the data's recorded token ids against that vocabulary, and the
    resolved config."""
    run = RunDir.of(cfg.run.dir)
    check_data_dir(cfg.data)  # before anything is made: a typo in data.dir leaves no run.dir behind
    if is_main:
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run.dir={cfg.run.dir}: {os_reason(exc)}") from None
        lock.acquire(run.lock)  # before anything is written: a second run on this folder is refused here
    data = open_data(cfg.data, is_main, wait)
    data.check_sizes()  # here, before a model is built: the readers open the shards again later
    if cfg.data.verify:
        verify_data(data, is_main)
    initial = initial_model(cfg.model, data) if cfg.model.init_from else None
    model_cfg = initial.model_cfg if initial is not None else model_config(cfg, data)
    data.check_token_ids(model_cfg.vocab_size)
    return RunSetup(run, data, model_cfg, resolved_config(cfg, model_cfg), initial)


def open_data(cfg: DataConfig, is_main: bool, wait: Callable[[], None] | None = None) -> TrainingData:
    """The prepared dataset of ``cfg.dir``, or the blend of ``cfg.mix``. A folder that holds none (which
    ``check_data_dir`` let through: the command named its source) is prepared first by the main process while the
    others wait (``wait``: a barrier of the process group, or by default a poll for the finished folder). The
    sources of a mix must be prepared already."""
    if cfg.mix is not None:
        return MixedData(cfg.mix)
    if is_main and read_meta(cfg.dir) is None:  # set_up_run has refused it unless cfg.prepare_if_missing
        # Imported only to prepare: `datasets` costs every rank ~90 MB of memory and a second of start-up.
        from llmtrain.data.prepare import prepare

        log.info("%s holds no prepared dataset: preparing it first (data=%s)", cfg.dir, cfg.source.value)
        prepare(cfg)
    (wait or (lambda: _poll_prepared(cfg.dir)))()
    return PreparedData(cfg.dir)


def verify_data(data: TrainingData, is_main: bool) -> None:
    """data.verify=true: read every shard and check it against its meta.json before the first step (the first
    problem is a ``UserError``). Every rank reads and checks the data it will train on, so every rank stops alike;
    the main process shows the progress and the result."""
    for report in data.verify(show_progress=is_main):
        if is_main:
            (log.warning if report.unchecked else log.info)("data.verify=true: %s", report.line())


def check_data_dir(cfg: DataConfig) -> None:
    """Refuse a data.dir that holds no prepared dataset unless the command named a source to prepare it from."""
    if cfg.mix is not None:
        MixedData(cfg.mix)  # every source prepared, with one tokenizer
        return
    if not cfg.prepare_if_missing and read_meta(cfg.dir) is None:
        raise UserError(f"data.dir={cfg.dir} holds no prepared dataset; prepare it with llmtrain-prepare, or name its "
                        f"source to prepare it first (e.g. data=stdlib)")


def _poll_prepared(data_dir: str, timeout_s: float = 600) -> None:
    """Wait without a process group (the parameter-server mode joins RPC only after set-up)."""
    deadline = time.time() + timeout_s
    while read_meta(data_dir) is None:
        if time.time() > deadline:
            raise UserError(f"data.dir={data_dir} was not prepared within {timeout_s / 60:.0f} minutes")
        time.sleep(1)


def model_config(cfg: TrainConfig, data: TrainingData) -> ModelConfig:
    """``cfg.model`` with its vocabulary from the data (model.vocab_size=0), refused when it disagrees."""
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or data.vocab_size)
    if model_cfg.vocab_size != data.vocab_size:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} but the tokenizer of {data.folder} has "
                        f"{data.vocab_size} tokens; leave model.vocab_size=0 to take it from the data")
    return model_cfg


def initial_model(model: ModelConfig, data: TrainingData) -> TrainedModel:
    """The model ``model.init_from`` names, at ``model.block_size``, ``model.dropout`` and ``model.capacity_factor``
    (how a mixture of experts trains, which a transformers folder does not say); its tokenizer must be the one
    ``data`` was prepared with, as a resumed checkpoint's must."""
    initial = open_trained(model.init_from, block_size=model.block_size)
    check_same_tokenizer(data.tokenizer_fingerprint, initial.tokenizer.fingerprint, f"data.dir={data.folder}",
                         f"model.init_from={model.init_from}",
                         "prepare it with data.tokenizer_path=<the model's tokenizer file>")
    vocab = initial.model_cfg.vocab_size
    if model.vocab_size not in (0, vocab) or vocab < data.vocab_size:
        raise UserError(f"model.init_from={model.init_from} has a vocabulary of {vocab} tokens; the data has "
                        f"{data.vocab_size} and model.vocab_size={model.vocab_size} (leave it 0)")
    cfg = dataclasses.replace(initial.model_cfg, dropout=model.dropout, capacity_factor=model.capacity_factor,
                              init_from=model.init_from)
    log.info("model.init_from=%s: %s, step %d; model.block_size=%d, model.dropout=%s and model.capacity_factor=%s "
             "from the config, the architecture from the folder", model.init_from, cfg, initial.step, cfg.block_size,
             cfg.dropout, cfg.capacity_factor)
    return dataclasses.replace(initial, model_cfg=cfg)


def resolved_config(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """The config as it runs (the vocabulary filled in): written to the run folder, each checkpoint and wandb."""
    return to_plain(dataclasses.replace(cfg, model=model_cfg))


def write_run_config(run: RunDir, resolved: dict[str, Any]) -> str:
    """Write the resolved config into the run folder (main process only); its YAML text, for checkpoints."""
    text = yaml.safe_dump(resolved, sort_keys=False)
    run.config.write_text(text)
    return text
