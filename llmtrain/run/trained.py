"""One trained model, whatever trained it, loaded on one process: configuration, fp32 weights, tokenizer.

``load_trained(path)`` accepts a run folder (its newest complete checkpoint, or ``step``), one checkpoint folder
of any ZeRO stage saved by any number of ranks (DeepSpeed's ``zero_to_fp32`` merges the shards; the original
world size is not needed), a folder in the consolidated format below, or a ``transformers`` folder of the GPT-2 or
Llama family or a Mixtral or Qwen2-MoE mixture of experts (``load_hf``). ``open_trained(path)`` is the same model
for starting a run from it (``model.init_from``): its weights a ``WeightSource`` that reads them from the safetensors
file(s) when they are copied into the model. The consolidated format does not depend on how the model was trained,
so every training mode exports through it:

    model.safetensors   weights by llmtrain's parameter names (a tied output head is stored once, as wte.weight)
    config.json         {"format": "llmtrain", "format_version": 1, "model": {ModelConfig}, "step": ...,
                         "tokens_seen": ..., "tokenizer_sha256": ..., "dtype": "fp32" | "bf16"}
    tokenizer.model     the tokenizer the run was trained with (a sentencepiece model, or tokenizer.json)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.config import ModelConfig, to_plain
from llmtrain.data.shards import find_tokenizer
from llmtrain.data.tokenizer import Tokenizer, check_same_tokenizer
from llmtrain.distributed.deepspeed import fp32_weights
from llmtrain.dtypes import torch_dtype
from llmtrain.errors import UserError
from llmtrain.hf_mapping import (
    WeightPair,
    fixed_problems,
    fixed_weights,
    from_hf_weights,
    hf_family_of,
    is_hf_folder,
    model_config_of,
    require_transformers,
    weight_pairs,
)
from llmtrain.model import build_model
from llmtrain.run.rundir import CONFIG as RUN_CONFIG
from llmtrain.run.rundir import MARKER, STATE, RunDir, damage, is_checkpoint_folder, read_marker
from llmtrain.weights import SafetensorsWeights, WeightSource

log = logging.getLogger("llmtrain")
FORMAT, FORMAT_VERSION = "llmtrain", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
HF_INDEX = "model.safetensors.index.json"
"""A transformers folder whose weights are split over several safetensors files: which file holds each tensor."""
PICKLED = "pickled weights (.bin/.pt) cannot be read in slices"


@dataclass
class TrainedModel:
    model_cfg: ModelConfig
    state_dict: Mapping[str, torch.Tensor]
    """fp32 (or the exported dtype) weights by parameter name; a tied head may be left out. A dict, or from
    ``open_trained`` a ``WeightSource`` that reads each tensor from the files when it is asked for."""
    tokenizer: Tokenizer
    source: Path
    step: int
    tokens_seen: int
    data_dir: str | None = None
    """The prepared dataset it was trained on, when known (checkpoints record it; exports do not)."""

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with these weights, in eval mode."""
        model = build_model(self.model_cfg)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        allowed = {"lm_head.weight"} if self.model_cfg.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise UserError(f"{self.source} does not match its model config (missing {sorted(set(missing) - allowed)},"
                            f" unexpected {sorted(unexpected)})")
        return model.to(device=device, dtype=dtype).eval()


def model_config_from(plain: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from its saved JSON form (enums from strings; fields added later keep their defaults)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), plain))


def resolve_checkpoint(path: str | Path, step: int = 0) -> Path:
    """The folder to load: an export folder, a checkpoint folder, or a run's newest (or ``step``) complete one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if ((path / CONFIG).is_file() and (path / WEIGHTS).is_file()) or is_hf_folder(path):
        return path
    if is_checkpoint_folder(path):
        if not (path / MARKER).is_file():
            raise UserError(f"{path} is an incomplete checkpoint (no {MARKER}: its save did not finish)")
        return path
    complete = RunDir(path).complete()
    if not complete:
        raise UserError(f"{path} holds no complete checkpoint (expected a run folder with checkpoints/step_*/"
                        f"{MARKER}, a step_* folder, or an exported folder with {WEIGHTS})")
    if step:
        chosen = [folder for s, folder in complete if s == step]
        if not chosen:
            raise UserError(f"{path} has no complete checkpoint of step {step}; it has steps "
                            f"{', '.join(str(s) for s, _ in sorted(complete))}")
        return chosen[0]
    return max(complete)[1]


def load_trained(path: str | Path, step: int = 0, tokenizer: str | Path | None = None,
                 block_size: int = 0) -> TrainedModel:
    """Load a trained model on this process; ``tokenizer`` (optional) must be the one it was trained with.
    ``block_size`` (0 = the model's own) changes the context it is built with: see ``with_block_size``."""
    folder = resolve_checkpoint(path, step)
    if is_hf_folder(folder):
        trained = load_hf(folder)
    else:
        trained = _read_folder(folder, _load_exported if (folder / WEIGHTS).is_file() else _load_checkpoint)
    return _check_tokenizer(with_block_size(trained, block_size or None), tokenizer)


class NotSliceable(Exception):
    """Weights that cannot be read a slice at a time; the message says why."""


def open_trained(path: str | Path, block_size: int = 0) -> TrainedModel:
    """``load_trained(path, block_size=...)`` for starting a run from it, with its weights left in the files: a
    ``WeightSource`` that reads each tensor, or the rows of it a rank needs, when it is copied into the model
    (``copy_weights``). Weights that cannot be read so (pickled .bin/.pt files, or safetensors names that
    transformers would have to convert first) are loaded whole, as ``load_trained`` does, and the log says why."""
    folder = resolve_checkpoint(path)
    try:
        if not is_hf_folder(folder) and not (folder / WEIGHTS).is_file():
            raise NotSliceable(PICKLED)  # a checkpoint of DeepSpeed's files
        trained = _read_folder(folder, _open_hf if is_hf_folder(folder) else _open_exported)
    except NotSliceable as why:
        log.info("%s: %s; every rank loads the whole model first", path, why)
        return load_trained(folder, block_size=block_size)
    return with_block_size(trained, block_size or None)


def stored_names(file: Path) -> list[str]:
    """The names of the tensors in one safetensors file (read from its header)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def _read_folder(folder: Path, read: Callable[[Path], TrainedModel]) -> TrainedModel:
    """``read(folder)``: a damaged checkpoint is refused naming the complete older ones, and files that do not read
    are one line."""
    from safetensors import SafetensorError

    problem = damage(folder) if (folder / MARKER).is_file() else None
    if problem:
        older = [str(s) for s, f in RunDir.holding(folder).complete() if f != folder]
        raise UserError(f"{folder} is damaged ({problem})" + (f"; load an older checkpoint with run.dir=<run> "
                        f"run.step=N (complete: steps {', '.join(older)})" if older else ""))
    try:
        return read(folder)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{folder} could not be loaded ({first}); it may be corrupt") from None


def with_block_size(trained: TrainedModel, block_size: int | None) -> TrainedModel:
    """``trained`` with another context (None: its own). RoPE takes any; a learned position table is cut to its
    first rows, and cannot grow (a new row would be untrained)."""
    cfg = trained.model_cfg
    if block_size is None or block_size == cfg.block_size:
        return trained
    weights = trained.state_dict
    if "wpe.weight" in weights:
        if block_size > cfg.block_size:
            raise UserError(f"{trained.source} has learned positions for {cfg.block_size} tokens, fewer than "
                            f"model.block_size={block_size}")
        if isinstance(weights, WeightSource):
            weights = weights.first_rows("wpe.weight", block_size)
        else:
            weights = {**weights, "wpe.weight": weights["wpe.weight"][:block_size].clone()}
    return dataclasses.replace(trained, model_cfg=dataclasses.replace(cfg, block_size=block_size),
                               state_dict=weights)


def _check_tokenizer(trained: TrainedModel, tokenizer: str | Path | None) -> TrainedModel:
    """``trained``, when ``tokenizer`` (optional) is the one it was trained with."""
    if tokenizer is not None:
        check_same_tokenizer(Tokenizer.load(tokenizer).fingerprint, trained.tokenizer.fingerprint,
                             f"tokenizer={tokenizer}", str(trained.source), "leave tokenizer unset to use the model's")
    return trained


def _load_exported(folder: Path) -> TrainedModel:
    from safetensors.torch import load_file

    return _exported(folder, lambda file: load_file(str(file)))


def _open_exported(folder: Path) -> TrainedModel:
    return _exported(folder, lambda file: SafetensorsWeights(dict.fromkeys(stored_names(file), file)))


def _exported(folder: Path, weights: Callable[[Path], Mapping[str, torch.Tensor]]) -> TrainedModel:
    """The consolidated folder, its weights ``weights(its model.safetensors)``."""
    meta = json.loads((folder / CONFIG).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder / CONFIG} is not an llmtrain export (format {meta.get('format')!r}, version "
                        f"{meta.get('format_version')!r}); a Hugging Face folder is loaded with transformers")
    tok = _tokenizer(find_tokenizer(folder), meta["tokenizer_sha256"], folder)
    data_dir = _data_dir(folder) if (folder / RUN_CONFIG).is_file() else None  # a run's own checkpoint
    return TrainedModel(model_config_from(meta["model"]), weights(folder / WEIGHTS), tok, folder,
                        int(meta["step"]), int(meta["tokens_seen"]), data_dir)


def _data_dir(folder: Path) -> str:
    import yaml

    return yaml.safe_load((folder / RUN_CONFIG).read_text())["data"]["dir"]


def _load_checkpoint(folder: Path) -> TrainedModel:
    state = json.loads((folder / STATE).read_text())
    marker = read_marker(folder)
    data_dir = _data_dir(folder)
    # checkpoints written before tokenizers were copied into them: the data folder's
    tok_path = find_tokenizer(folder) or find_tokenizer(Path(data_dir))
    tok = _tokenizer(tok_path, state["tokenizer_sha256"], folder)
    model_cfg = model_config_from(state["model"])
    weights = fp32_weights(folder, int(marker["zero_stage"]), model_cfg, int(marker.get("tensor_parallel", 1)),
                           int(marker.get("pipeline_parallel", 1)))
    return TrainedModel(model_cfg, weights, tok, folder, int(state["step"]), int(state["tokens_seen"]), data_dir)


def _tokenizer(path: Path | None, sha256: str, folder: Path) -> Tokenizer:
    if path is None or not path.is_file():
        raise UserError(f"the tokenizer of {folder} is missing (no tokenizer.model or tokenizer.json)")
    tok = Tokenizer.load(path)
    check_same_tokenizer(tok.fingerprint, sha256, str(path), f"the model of {folder}",
                         "copy the tokenizer it was trained with into the folder")
    return tok


def save_consolidated(trained: TrainedModel, out: str | Path, dtype: str = "fp32") -> Path:
    """Write ``trained`` into ``out`` in the consolidated format (a tied head stored once)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in trained.state_dict.items()
               if not (trained.model_cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(weights, str(out / WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_plain(trained.model_cfg),
            "step": trained.step, "tokens_seen": trained.tokens_seen,
            "tokenizer_sha256": trained.tokenizer.fingerprint, "dtype": dtype}
    (out / CONFIG).write_text(json.dumps(meta, indent=1))
    trained.tokenizer.save(out / trained.tokenizer.file_name)
    return out


def load_hf(folder: str | Path) -> TrainedModel:
    """A transformers folder of the GPT-2 or Llama family, or a Mixtral or Qwen2-MoE, as a TrainedModel in fp32
    (step 0), with the folder's tokenizer."""
    folder = Path(folder).expanduser()
    header = _hf_header(folder)
    from transformers import AutoModelForCausalLM  # an optional extra: imported when a folder needs it

    try:
        with warnings.catch_warnings():  # a Qwen2-MoE without shared experts has a 0-wide one: torch warns of it
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"transformers could not load {folder} ({str(exc).strip().splitlines()[0][:200]})") from None
    theirs = model.state_dict()  # a transformers 5 MoE's experts stacked: the pairs' ``loaded`` names
    left = _unmapped(theirs, header)
    if left:
        raise UserError(f"{folder} holds weights llmtrain has no place for: {', '.join(left[:4])}")
    _check_fixed(folder, header, theirs.__getitem__)
    return TrainedModel(header.cfg, from_hf_weights(header.pairs, theirs), header.tokenizer, folder, step=0,
                        tokens_seen=0)


def _open_hf(folder: Path) -> TrainedModel:
    """``load_hf(folder)`` with its weights left in its safetensors file(s); NotSliceable where its stored names are
    not those of ``weight_pairs`` (older GPT-2 folders name theirs without the ``transformer.`` prefix: transformers
    renames them on loading) or it has no safetensors."""
    header = _hf_header(folder)
    files = _hf_safetensors(folder)
    odd = _unmapped(files, header) + _unmapped_pieces(files, header)
    if odd:
        raise NotSliceable(f"its safetensors names are not all the ones llmtrain maps (such as {odd[0]})")
    _check_fixed(folder, header, SafetensorsWeights({name: files[name] for name in header.fixed}).__getitem__)
    return TrainedModel(header.cfg, SafetensorsWeights(files, header.pairs), header.tokenizer, folder, step=0,
                        tokens_seen=0)


@dataclass
class _HfHeader:
    """What a transformers folder's config.json and tokenizer say: our model config (refused when our GPT cannot
    compute it), the mapping of its weights, the tensors that must hold one value (``fixed_weights``)."""

    cfg: ModelConfig
    pairs: list[WeightPair]
    fixed: dict[str, float]
    tokenizer: Tokenizer


def _hf_header(folder: Path) -> _HfHeader:
    require_transformers(f"loading {folder}")
    from transformers import AutoConfig  # an optional extra: imported when a folder needs it

    hf = AutoConfig.from_pretrained(folder)
    cfg = model_config_of(hf, folder)
    tokenizer_file = find_tokenizer(folder)
    if tokenizer_file is None:
        raise UserError(f"{folder} has no tokenizer (tokenizer.model or tokenizer.json); copy the model's "
                        "tokenizer into it")
    family = hf_family_of(hf)  # the folder's names (a Qwen2-MoE that Mixtral could hold keeps Qwen2-MoE's)
    return _HfHeader(cfg, weight_pairs(cfg, family), fixed_weights(cfg, family), Tokenizer.load(tokenizer_file))


def _check_fixed(folder: Path, header: _HfHeader, read: Callable[[str], torch.Tensor]) -> None:
    problems = fixed_problems(header.fixed, read)
    if problems:
        raise UserError(f"{folder}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _hf_safetensors(folder: Path) -> dict[str, Path]:
    """The safetensors file of each tensor of a transformers folder (its model.safetensors, else the files its index
    names), as transformers picks them; NotSliceable when it has pickled weights only."""
    if (folder / WEIGHTS).is_file():
        return dict.fromkeys(stored_names(folder / WEIGHTS), folder / WEIGHTS)
    if (folder / HF_INDEX).is_file():
        weight_map = json.loads((folder / HF_INDEX).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    raise NotSliceable(PICKLED)


def _unmapped(theirs: Mapping[str, Any], header: _HfHeader) -> list[str]:
    """Names of ``theirs`` (stored or loaded) that no pair maps and that are not fixed (a tied head, stored or not,
    is our wte)."""
    tied = {"lm_head.weight"} if header.cfg.tie_embeddings else set()
    loaded = {pair.loaded for pair in header.pairs}
    return sorted(set(theirs) - _mapped(header.pairs) - loaded - set(header.fixed) - tied)


def _unmapped_pieces(theirs: Mapping[str, Any], header: _HfHeader) -> list[str]:
    """Stored names the pairs map, or fixed ones, that ``theirs`` does not hold."""
    return sorted((_mapped(header.pairs) | set(header.fixed)) - set(theirs))


def _mapped(pairs: list[WeightPair]) -> set[str]:
    """Every stored transformers name the pairs map."""
    return {name for pair in pairs for name in pair.theirs}
