"""How every prepare mode writes its output folder: check the target, build in a staging folder, publish.

A prepare (``prepare``, ``streaming``, each phase of ``tasks``) first asks ``check_target`` whether the folder is
already prepared with this config, then writes everything into ``staging(target)``, a fresh folder beside it
that is removed on any failure, and moves it into place with ``publish`` only when complete: a killed prepare
never leaves a folder that looks finished. ``build_meta`` is the meta.json they all write, ``PrepareReport``
what they all return.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llmtrain
from llmtrain.config import DataConfig, to_plain
from llmtrain.data.shards import FORMAT_VERSION, MAX_ID, META_FILE, read_meta, recorded_max_id, token_dtype
from llmtrain.data.sources import CorpusStats
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.errors import UserError, os_reason

STAGING_PREFIX = ".partial-"
log = logging.getLogger("llmtrain")


@dataclass
class PrepareReport:
    """What a prepare did: the written meta (or the existing one) and seconds spent per stage.

    A plan or tokenize task (``data.task=plan|<i>``) reports its own folder and json instead, described by ``note``.
    """

    data_dir: Path
    meta: dict[str, Any]
    skipped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    note: str | None = None

    def line(self) -> str:
        """The one line the CLI prints: the folder and what it holds."""
        return f"{self.data_dir}: {self.note if self.note is not None else describe(self.meta)}"

    @property
    def total_seconds(self) -> float:
        """Seconds spent in all stages together."""
        return sum(self.seconds.values())


class Stopwatch:
    """Seconds spent per named stage, summed over every time a stage runs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body and add it to stage ``name``."""
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def check_target(target: Path, cfg: DataConfig) -> dict[str, Any] | None:
    """Return the existing meta if ``target`` is already prepared with this config; refuse conflicts.

    ``data.overwrite=true`` prepares the folder again even with the same config: that is how a damaged folder, or
    one prepared before shard checksums were recorded, is made anew."""
    if target.exists() and not target.is_dir():
        raise UserError(f"data.dir={target} exists and is not a folder")
    meta = read_meta(target) if target.is_dir() else None
    if meta is not None:
        if meta.get("config_fingerprint") == cfg.fingerprint() and _same_tokenizer(meta, cfg):
            if not cfg.overwrite:
                return meta
            log.info("%s is prepared with this config; data.overwrite=true: preparing it again", target)
        elif not cfg.overwrite:
            raise UserError(f"data.dir={target} was prepared with another config or tokenizer "
                            f"({_config_diff(meta.get('config', {}), to_plain(cfg))}); "
                            "pass data.overwrite=true to replace it, or choose another data.dir")
    elif target.is_dir() and any(target.iterdir()) and not cfg.overwrite:
        raise UserError(f"data.dir={target} is not empty and holds no prepared dataset; "
                        "choose an empty folder or pass data.overwrite=true")
    return None


def _same_tokenizer(meta: dict[str, Any], cfg: DataConfig) -> bool:
    if cfg.tokenizer_path is None:
        return True  # trained from the config, which the fingerprint already covers
    return Tokenizer.load(cfg.tokenizer_path).fingerprint == meta["tokenizer"]["sha256"]


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
               if k not in DataConfig.RUNTIME_ONLY and old.get(k) != v]
    return ", ".join(changed) or "different tokenizer"


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target``, removed on any failure; stale ones from killed runs are cleared."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.dir={target} cannot be created ({os_reason(exc)})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"data.dir={target} is not writable (no write permission on {parent})")
    for stale in parent.glob(f".{target.name}{STAGING_PREFIX}*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    stage = parent / f".{target.name}{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as exc:
        raise UserError(f"data.dir={target} is not writable ({os_reason(exc)})") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def publish(stage: Path, target: Path) -> None:
    """Move the complete staging folder to ``target``; an old ``target`` is set aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_meta(cfg: DataConfig, tokenizer: Tokenizer, splits: dict[str, Any], stats: CorpusStats) -> dict[str, Any]:
    """The meta.json of a prepared folder; refuses a training split without tokens."""
    if splits["train"]["tokens"] == 0:
        raise UserError("the training split holds no tokens")
    largest = recorded_max_id({"splits": splits})
    assert largest is not None, "ShardWriter records every shard's largest id"
    return {
        "format_version": FORMAT_VERSION,
        "llmtrain_version": llmtrain.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "eod_id": tokenizer.eod_id,
        MAX_ID: largest[0],
        "tokenizer": {"file": tokenizer.file_name, "sha256": tokenizer.fingerprint},
        "splits": splits,
        "source": {"kind": cfg.source.value, **asdict(stats)},
        "config": to_plain(cfg),
        "config_fingerprint": cfg.fingerprint(),
    }


def describe(meta: dict[str, Any]) -> str:
    """One line about a prepared dataset."""
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    return (f"{meta['source']['kind']}: {tr['documents'] + va['documents']} documents, vocab {meta['vocab_size']}, "
            f"{tr['tokens']:,} train / {va['tokens']:,} val tokens ({meta['dtype']}), {META_FILE} ok")
