"""The roots of the other commands: ``llmtrain-prepare``, ``-generate``, ``-export``, ``-eval`` and ``-ngram``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from llmtrain.config.checks import (
    MAX_CONTEXT,
    MAX_COUNT,
    MAX_SEED,
    MAX_VOCAB,
    bounded,
    bounded_each,
    nonempty,
    raise_problems,
)
from llmtrain.config.data import DataConfig
from llmtrain.config.loop import WandbConfig


class Device(str, Enum):
    """Where a single-process command (generate, eval) runs."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ExportFormat(str, Enum):
    safetensors = "safetensors"
    hf = "hf"


class WeightDtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"

@dataclass(kw_only=True)
class PrepareConfig:
    """Root of ``llmtrain-prepare``."""

    data: DataConfig = field(default_factory=DataConfig)
    """The corpus to prepare."""
    verify: bool = False
    """Prepare nothing: check the prepared data.dir's shards against the sizes, token ids and checksums in its
    meta.json."""

    def __post_init__(self) -> None:
        if self.data.mix is not None:
            raise_problems(["data.mix blends prepared folders for training; prepare each source on its own"], "data")
        raise_problems(nonempty("data.dir", self.data.dir, "give the folder to prepare, data.dir=<folder>"), "data")


@dataclass(kw_only=True)
class TrainedRef:
    """A trained model to load."""

    dir: str = MISSING
    """A run folder (its newest complete checkpoint), one of its checkpoints/step_* folders, or an exported folder."""
    step: int = 0
    """With a run folder: load this step's checkpoint instead of the newest (0 = newest)."""

    def __post_init__(self) -> None:
        problems = nonempty("run.dir", self.dir, "give a run, checkpoint or exported folder, run.dir=runs/<name>")
        problems += bounded("run.step", self.step, 0, MAX_COUNT)
        raise_problems(problems, "run")


@dataclass(kw_only=True)
class SamplingConfig:
    """How generated tokens are chosen."""

    max_new_tokens: int = 100
    """Tokens to generate per prompt (at most; generation also stops at end-of-document)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = all."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p, in (0, 1]; 1 = all."""
    stop_at_eod: bool = True
    """Stop a sample at the end-of-document token."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded("max_new_tokens", self.max_new_tokens, 1, MAX_CONTEXT)
        problems += bounded("temperature", self.temperature, 0.0)
        problems += bounded("top_k", self.top_k, 0, MAX_VOCAB)
        problems += bounded("top_p", self.top_p, 0.0, 1.0, low_open=True)
        raise_problems(problems, "sampling")


@dataclass(kw_only=True)
class GenerateConfig(SamplingConfig):
    """Root of ``llmtrain-generate``."""

    run: TrainedRef = field(default_factory=TrainedRef)
    """The model to sample from."""
    prompt: str = ""
    """The prompt; empty = an unconditional sample (a new document)."""
    prompts_file: str = ""
    """A UTF-8 file of prompts, one per line (escape a newline inside a prompt as \\n); used instead of prompt."""
    seed: int = 1234
    """Seed of the sampler: the same seed, prompts and batch give the same samples."""
    batch_size: int = 8
    """Prompts decoded together (left-padded to the longest)."""
    echo_prompt: bool = True
    """Print each prompt before its continuation."""
    device: Device = Device.auto
    """auto (cuda when present) | cpu | cuda."""
    dtype: WeightDtype = WeightDtype.fp32
    """Weights and activations: fp32 | bf16."""
    tokenizer: str = ""
    """Optional tokenizer file to check against the one the model was trained with."""

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.prompt and self.prompts_file:
            problems.append("give prompt=... or prompts_file=..., not both")
        problems += bounded("batch_size", self.batch_size, 1, 1 << 16)
        problems += bounded("seed", self.seed, 0, MAX_SEED)
        raise_problems(problems, "generate")


@dataclass(kw_only=True)
class ExportConfig:
    """Root of ``llmtrain-export``."""

    run: TrainedRef = field(default_factory=TrainedRef)
    """The model to export."""
    format: ExportFormat = ExportFormat.safetensors
    """safetensors (llmtrain's consolidated folder) | hf (a folder transformers loads: GPT-2 or Llama)."""
    out: str = MISSING
    """Output folder (must be empty or absent unless overwrite=true)."""
    dtype: WeightDtype = WeightDtype.fp32
    """Weights written as fp32 | bf16."""
    overwrite: bool = False
    """Replace the files of an existing non-empty out folder."""

    def __post_init__(self) -> None:
        raise_problems(nonempty("out", self.out, "give the output folder, out=exports/<name>"), "export")


@dataclass(kw_only=True)
class EvalConfig:
    """Root of ``llmtrain-eval``."""

    run: TrainedRef = field(default_factory=TrainedRef)
    """The model to evaluate."""
    data_dir: str = ""
    """A prepared dataset whose validation windows to score; empty = the run's own data.dir."""
    text_file: str = ""
    """A UTF-8 text file to score instead (one document, tokenized with the run's tokenizer)."""
    max_windows: int = 0
    """Score at most this many windows; 0 = all."""
    batch_size: int = 16
    """Windows per forward pass."""
    device: Device = Device.auto
    """auto (cuda when present) | cpu | cuda."""
    dtype: WeightDtype = WeightDtype.fp32
    """fp32 | bf16."""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks to run instead of perplexity, e.g. tasks=[hellaswag,arc_easy] (pip install
    'llmtrain[eval]'); log-likelihood tasks only."""
    task_dir: str = ""
    """A folder of more lm-eval task YAMLs (local tasks), searched besides lm-eval's own; the tasks run from it,
    so data files its YAMLs name by relative path are found beside them."""
    limit: int = 0
    """tasks: score at most this many documents per task; 0 = all."""
    num_fewshot: int | None = None
    """tasks: few-shot examples per prompt; null = each task's default."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """tasks: log the results table to wandb (wandb.mode=online|offline)."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded_each("", self, {"max_windows": (0, MAX_COUNT), "batch_size": (1, 1 << 16),
                                            "limit": (0, MAX_COUNT)})
        if self.num_fewshot is not None:
            problems += bounded("num_fewshot", self.num_fewshot, 0, 1 << 16)
        if not all(task.strip() for task in self.tasks):
            problems.append(f"tasks={self.tasks} names an empty task")
        if (self.task_dir or self.limit or self.num_fewshot is not None) and not self.tasks:
            problems.append("task_dir, limit and num_fewshot apply to tasks=[...], which is empty")
        if self.tasks and (self.text_file or self.data_dir or self.max_windows):
            problems.append("tasks=[...] runs lm-eval; text_file, data_dir and max_windows are for perplexity")
        raise_problems(problems, "eval")


@dataclass(kw_only=True)
class NgramConfig:
    """Root of ``llmtrain-ngram``: the interpolated Kneser-Ney baseline."""

    data: DataConfig = field(default_factory=DataConfig)
    """The prepared dataset (data.dir)."""
    order: int = 3
    """n of the n-gram model."""
    discount: float = 0.0
    """Kneser-Ney discount for every order; 0 = estimated per order as n1 / (n1 + 2 n2)."""
    train_tokens: int = 0
    """Fit on the windows a training run would read first, this many tokens in all (0 = the whole train split)."""
    block_size: int = 256
    """Window length: the same as the model compared with, so both score the same validation tokens."""
    seed: int = 1337
    """The training run's train.seed (it fixes which windows come first; 1337 is train.seed's default)."""
    max_windows: int = 0
    """Score at most this many validation windows; 0 = all."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded_each("", self, {"order": (1, 16), "train_tokens": (0, MAX_COUNT),
                                            "block_size": (1, MAX_CONTEXT), "seed": (0, MAX_SEED),
                                            "max_windows": (0, MAX_COUNT)})
        problems += bounded("discount", self.discount, 0.0, 1.0, high_open=True)
        if self.data.mix is not None:
            problems.append("llmtrain-ngram fits one data.dir; data.mix is not supported")
        else:
            problems += nonempty("data.dir", self.data.dir, "give a prepared folder, data.dir=<folder>")
        raise_problems(problems, "ngram")
