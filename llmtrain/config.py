"""The typed configuration schema of llmtrain.

One dataclass per section, one root per entry point. Hydra composes YAML files from ``conf/`` onto these
schemas (``register_configs`` puts them in the ConfigStore); each CLI turns the result into these objects on
its first line, so code below ``llmtrain/cli`` never sees a ``DictConfig``.

Checks inside a section live in its ``__post_init__``; every problem is collected and raised as one
``ValueError`` that names the override to change. Nothing here probes hardware or touches the file system.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING


class Source(str, Enum):
    """Where ``llmtrain-prepare`` reads documents from."""

    stdlib = "stdlib"
    text = "text"
    hf = "hf"


class TokenizerType(str, Enum):
    """The sentencepiece model type."""

    bpe = "bpe"
    unigram = "unigram"


class TextUnit(str, Enum):
    """What one document is inside a plain-text file."""

    document = "document"
    paragraph = "paragraph"
    line = "line"


class Arch(str, Enum):
    """The model family: the Transformer, or the recurrent baseline it must beat."""

    gpt = "gpt"
    lstm = "lstm"


class Norm(str, Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class MLP(str, Enum):
    gelu = "gelu"
    gelu_exact = "gelu_exact"
    swiglu = "swiglu"


class Positions(str, Enum):
    learned = "learned"
    rope = "rope"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OptimizerName(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Decay(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Transport(str, Enum):
    tcp = "tcp"
    auto = "auto"
    grpc = "grpc"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Mode(str, Enum):
    """How ranks train together: synchronous DeepSpeed ZeRO, or asynchronous SGD through parameter servers."""

    sync = "sync"
    async_ps = "async_ps"


class Resume(str, Enum):
    """What a run does in a run.dir that already holds a history (checkpoints, metrics.jsonl)."""

    auto = "auto"
    restart = "restart"


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


# Upper bounds no real run reaches, so that an absurd value is refused in one line instead of failing later in
# torch, numpy or the operating system (an allocation of terabytes, an integer that no longer fits 64 bits).
MAX_COUNT = 2**63 - 1
"""Steps, windows, documents, tokens: what fits a signed 64-bit integer (numpy's and torch's)."""
MAX_SEED = 2**63 - 1
"""Seeds: torch.manual_seed takes < 2**64 and numpy's seed sequences non-negative integers; the margin lets a seed
be offset (data.seed + 1, generate's seed + prompt index) and stay in range."""
MAX_LAYERS = 1024
"""model.n_layer and model.n_head (the deepest published Transformers have ~100 layers, ~128 heads)."""
MAX_WIDTH = 65536
"""model.n_embd (the widest published models are ~25k); model.mlp_hidden up to 4x this."""
MAX_CONTEXT = 1 << 20
"""model.block_size, ngram block_size: a training window of a million tokens."""
MAX_VOCAB = 1 << 20
"""Vocabulary sizes (published tokenizers have up to ~260k tokens)."""
MAX_TIMEOUT_S = 10**6
"""Timeouts (~12 days; a longer one overflows the timedelta and int64 milliseconds of torch.distributed)."""


def bounded(name: str, value: float, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False) -> list[str]:
    """``[]`` when ``value`` lies in the interval from ``low`` to ``high`` (open ends where asked), else the problem
    as ``name=value must be ...``. NaN and infinities are always out: every comparison is written so NaN fails it."""
    finite = not isinstance(value, float) or math.isfinite(value)
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if finite and above and below:
        return []
    low, high = _shown(low), _shown(high)
    if isinstance(value, float) and low is not None and high is not None:  # a range of fractions: [0, 1), (0, 1]
        return [f"{name}={value} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"]
    if finite and above:  # over a cap
        return [f"{name}={value} must be {'<' if high_open else '<='} {'2**63 - 1' if high == MAX_COUNT else high}"]
    return [f"{name}={value} must be {'>' if low_open else '>='} {low}"
            + (" and finite" if isinstance(value, float) else "")]


def _shown(bound: float | None) -> float | None:
    """A bound as the message shows it: 0 and 1, not 0.0 and 1.0."""
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def bounded_each(section: str, obj: Any, ranges: dict[str, tuple[float | None, float | None]]) -> list[str]:
    """``bounded`` for several closed ranges of one section: ``{"max_steps": (1, MAX_COUNT)}``."""
    return [problem for name, (low, high) in ranges.items()
            for problem in bounded(f"{section}{name}", getattr(obj, name), low, high)]


def nonempty(name: str, value: str, hint: str) -> list[str]:
    """A required text (a folder, a name) that is empty or only spaces: the problem, with what to give."""
    return [] if value.strip() else [f"{name} is empty: {hint}"]


def raise_problems(problems: list[str], section: str) -> None:
    """Raise one ``ValueError`` listing every problem found in a section (no-op when there are none)."""
    if problems:
        raise ValueError(f"invalid {section} config: " + "; ".join(problems))


@dataclass(kw_only=True)
class MixSource:
    """One prepared dataset of a weighted training mixture (``data.mix``)."""

    dir: str = MISSING
    """A folder written by llmtrain-prepare; every source of a mix has the same tokenizer."""
    weight: float = 1.0
    """Its share of the training samples, relative to the other sources' weights (> 0)."""
    name: str = ""
    """Its name in metrics (tokens_seen/<name>, val_loss/<name>); empty = the folder's name."""


@dataclass(kw_only=True)
class DataConfig:
    """The corpus, its tokenizer and its packing (written by ``llmtrain-prepare``, read by training)."""

    source: Source = Source.stdlib
    """Corpus source: stdlib (the running Python's standard library, no download) | text (local files) | hf."""
    dir: str = MISSING
    """Folder of the prepared dataset: shards, tokenizer (.model or .json) and meta.json (not needed with data.mix)."""
    mix: list[MixSource] | None = None
    """Training: a weighted blend of prepared folders instead of data.dir, e.g.
    '[{dir: data/prose, weight: 0.7}, {dir: data/code, weight: 0.3}]'; each source keeps its own epoch order."""
    paths: list[str] = field(default_factory=list)
    """source=text: files, folders (searched recursively) or glob patterns; .txt/.jsonl/.json/.parquet."""
    text_field: str = "text"
    """source=text (.jsonl/.parquet) and source=hf: the column that holds the document text."""
    text_unit: TextUnit = TextUnit.document
    """source=text, plain files: one document per file | per blank-line paragraph | per line."""
    hf_name: str | None = None
    """source=hf: the `datasets` hub name (needs network; not used in tests)."""
    hf_config: str | None = None
    """source=hf: the dataset configuration name."""
    hf_split: str = "train"
    """source=hf: the split to read."""
    max_documents: int = 0
    """Keep only N documents (the first N in the seed-shuffled file order; 0 = all); for quick experiments."""
    vocab_size: int = 8192
    """Tokenizer vocabulary size (byte fallback needs at least 259 + a few merges)."""
    tokenizer_type: TokenizerType = TokenizerType.bpe
    """sentencepiece model type."""
    tokenizer_sample_documents: int = 1000
    """Number of training documents (chosen by seed) the tokenizer is trained on."""
    tokenizer_path: str | None = None
    """Reuse this tokenizer instead of training one: a sentencepiece .model, or a Hugging Face tokenizer.json."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (chosen by seed, at least one document)."""
    seed: int = 1234
    """Seed of the train/val split and the tokenizer sample."""
    num_proc: int = 2
    """Processes used to tokenize (Dataset.map num_proc; sentencepiece threads with data.streaming=true)."""
    shard_tokens: int = 1 << 26
    """Maximum tokens per shard file."""
    overwrite: bool = False
    """Prepare data.dir again even when it is already prepared (with this config or another)."""
    prepare_if_missing: bool = False
    """Training: prepare data.dir first when it holds no dataset (set by naming a source: data=stdlib|text|hf)."""
    num_tasks: int = 1
    """Split tokenizing into this many independent tasks, each run by its own data.task=<i> (slurm/prepare.sh)."""
    task: str = "all"
    """all: the whole prepare in this process | plan | <i> in [0, num_tasks): tokenize slice i | merge: meta.json."""
    streaming: bool = False
    """Tokenize a stream (datasets' IterableDataset) in bounded memory; its val split is per document, not by count."""
    allow_invalid_utf8: bool = False
    """Prepare a corpus even when more than half of its bytes are in files that are not UTF-8 text (an invalid
    sequence per 10 bytes or more: binary data or another encoding); each invalid sequence is replaced by U+FFFD."""
    verify: bool = False
    """Training: before the first step every rank reads every shard and checks its size, token ids and the checksum
    meta.json records."""

    def __post_init__(self) -> None:
        problems = []
        problems += self._task_problems()
        if self.source == Source.text and not self.paths:
            problems.append("data=text needs data.paths=[file,...]")
        if self.source == Source.hf and not self.hf_name:
            problems.append("data=hf needs data.hf_name=<dataset>")
        problems += bounded_each("data.", self, {
            "num_proc": (1, 1024), "shard_tokens": (1024, 1 << 40),
            "max_documents": (0, MAX_COUNT), "tokenizer_sample_documents": (1, MAX_COUNT), "seed": (0, MAX_SEED)})
        if not 260 <= self.vocab_size <= MAX_VOCAB:
            problems.append(f"data.vocab_size={self.vocab_size} must be in [260, {MAX_VOCAB}]")
        problems += bounded("data.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        problems += nonempty("data.text_field", self.text_field, "name the column that holds the text")
        problems += nonempty("data.hf_split", self.hf_split, "name the split to read, e.g. data.hf_split=train")
        problems += self._mix_problems()
        raise_problems(problems, "data")

    def _mix_problems(self) -> list[str]:
        if self.mix is None:
            return []
        problems = []
        if not self.mix:
            problems.append("data.mix=[] names no source; give at least one {dir: ..., weight: ...}")
        if self.dir:
            problems.append(f"data.dir={self.dir} and data.mix are both set: train on a mix with data.dir=''")
        for i, source in enumerate(self.mix):
            problems += bounded(f"data.mix[{i}].weight", source.weight, 0.0, low_open=True)
            problems += nonempty(f"data.mix[{i}].dir", source.dir, "give a prepared folder")
        names = [source.name or Path(source.dir).name for source in self.mix]
        if len(set(names)) < len(names):
            problems.append(f"data.mix names {names} repeat; give each source its own name: ...")
        return problems

    def _task_problems(self) -> list[str]:
        if self.num_tasks < 1 or self.num_tasks > 1 << 20:
            return bounded("data.num_tasks", self.num_tasks, 1, 1 << 20)
        if self.streaming and (self.num_tasks > 1 or self.task != "all"):
            return ["data.streaming=true runs in one process: leave data.num_tasks=1 and data.task=all"]
        if self.task == "all":
            if self.num_tasks > 1:
                return [f"data.num_tasks={self.num_tasks} needs data.task=plan, then 0..{self.num_tasks - 1}, then "
                        "merge (bash slurm/prepare.sh runs them as a Slurm array)"]
            return []
        if self.task in ("plan", "merge") or (self.task.isdigit() and int(self.task) < self.num_tasks):
            return []
        return [f"data.task={self.task} must be all, plan, merge or a task number in [0, {self.num_tasks})"]

    @property
    def task_index(self) -> int | None:
        """The number of the tokenize task this process runs (data.task=<i>), or None for all/plan/merge."""
        return int(self.task) if self.task.isdigit() else None

    # Fields that change how a prepare runs but not what it writes (num_tasks/task: the merged folder is the same).
    RUNTIME_ONLY = ("dir", "mix", "num_proc", "overwrite", "prepare_if_missing", "num_tasks", "task",
                    "allow_invalid_utf8", "verify")
    # Fields added after datasets were prepared: at these values they stay out of the fingerprint, so a folder
    # prepared before the field existed still counts as prepared with the same config.
    FINGERPRINT_SINCE = {"streaming": False}

    def fingerprint(self) -> str:
        """SHA-256 of every field that determines the prepared output (not the RUNTIME_ONLY ones)."""
        payload = {k: v for k, v in to_plain(self).items()
                   if k not in self.RUNTIME_ONLY and self.FINGERPRINT_SINCE.get(k, ...) != v}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(kw_only=True)
class ModelConfig:
    """The model: a decoder-only Transformer or the LSTM baseline (``model=<preset>`` picks conf/model/)."""

    name: str = "custom"
    """Preset name, for logs and exports."""
    arch: Arch = Arch.gpt
    """gpt (decoder-only Transformer) | lstm (embedding -> n_layer LSTM of width n_embd -> head; a baseline)."""
    n_layer: int = 4
    """Number of Transformer blocks (LSTM layers for arch=lstm)."""
    n_head: int = 4
    """Attention heads (query heads)."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 = n_head (plain multi-head attention)."""
    n_embd: int = 128
    """Residual stream width."""
    block_size: int = 256
    """Context length in tokens (the training window; a limit on generation for arch=gpt only)."""
    vocab_size: int = 0
    """Vocabulary size; 0 = take it from the prepared dataset (the usual case)."""
    norm: Norm = Norm.layernorm
    """Normalization: layernorm | rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    mlp: MLP = MLP.gelu
    """Feed-forward: gelu (4x width; GELU's tanh approximation, as GPT-2) | gelu_exact (the same with the exact,
    erf GELU: faster on CPUs) | swiglu (gated, hidden width mlp_hidden)."""
    mlp_hidden: int = 0
    """Feed-forward hidden width; 0 = 4*n_embd for gelu, 8/3*n_embd rounded up to a multiple of 64 for swiglu."""
    pos: Positions = Positions.learned
    """Positions: learned absolute embeddings | rope (rotary)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings."""
    bias: bool = False
    """Biases in linear layers and norms."""
    init_std: float = 0.02
    """Standard deviation of the weight init; residual projections get init_std / sqrt(2 * n_layer)."""
    init_from: str = ""
    """Start from these weights: a transformers folder (GPT-2 or Llama family) or an llmtrain export, checkpoint or
    run. Its architecture replaces the fields above except block_size (the training window) and dropout."""

    def __post_init__(self) -> None:
        problems = bounded_each("model.", self, {
            "n_layer": (1, MAX_LAYERS), "n_head": (1, MAX_LAYERS), "n_kv_head": (0, MAX_LAYERS),
            "n_embd": (1, MAX_WIDTH), "block_size": (1, MAX_CONTEXT), "vocab_size": (0, MAX_VOCAB),
            "mlp_hidden": (0, 4 * MAX_WIDTH)})
        if not problems:  # the shape checks divide by these sizes
            problems += self._shape_problems()
        problems += bounded("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        for name in ("norm_eps", "rope_theta", "init_std"):
            problems += bounded(f"model.{name}", getattr(self, name), 0.0, low_open=True)
        raise_problems(problems, "model")

    def _shape_problems(self) -> list[str]:
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            return [f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}"]
        if self.n_head % kv:
            return [f"model.n_head={self.n_head} must be divisible by model.n_kv_head={kv}"]
        if self.pos == Positions.rope and (self.n_embd // self.n_head) % 2:
            return [f"model.pos=rope needs an even head size, got {self.n_embd // self.n_head}"]
        return []

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == MLP.swiglu:
            return -(-int(8 * self.n_embd / 3) // 64) * 64
        return 4 * self.n_embd


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: OptimizerName = OptimizerName.adamw
    """adamw (DeepSpeed's CPU Adam when the optimizer is offloaded) | sgd (with momentum)."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio at train.max_steps."""
    warmup_steps: int = 100
    """Linear warm-up from 0 over this many optimizer steps."""
    decay: Decay = Decay.cosine
    """After warm-up: cosine | linear | constant."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to weight matrices and embeddings only (not to norms or biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded("optim.lr", self.lr, 0.0, low_open=True)
        problems += bounded("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        problems += bounded("optim.warmup_steps", self.warmup_steps, 0, MAX_COUNT)
        for name in ("beta1", "beta2", "momentum"):
            problems += bounded(f"optim.{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        problems += bounded("optim.eps", self.eps, 0.0, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            problems += bounded(f"optim.{name}", getattr(self, name), 0.0)
        raise_problems(problems, "optim")


@dataclass(kw_only=True)
class TrainLoopConfig:
    """Steps, batch sizes, evaluation, checkpoints and logging cadence."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all ranks = micro_batch_size x grad accumulation x data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    seed: int = 1337
    """Seed of the model init and the data order."""
    subset_tokens: int = 0
    """Train on a fixed subset of the train split, this many tokens in whole windows (the run's first windows),
    repeated epoch after epoch; 0 = the whole split. For small-data comparisons (docs/benchmarks.md, "Baselines")."""
    eval_every: int = 100
    """Evaluate on the fixed validation windows every N steps (0 = only at the end)."""
    eval_windows: int = 200
    """Validation windows per evaluation (0 = all), spread evenly over the val split."""
    checkpoint_every: int = 200
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest K complete checkpoints."""
    checkpoint_async: bool = True
    """Save without stopping: the loop waits only while each rank copies its state to host memory (kept there for
    the next save: one more copy of this rank's part of a checkpoint), a background thread writes it, and the
    checkpoint is marked complete once every rank's files are on the disk. false = the loop waits for the write."""
    log_every: int = 10
    """Log metrics every N steps."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each is skipped)."""
    stop_at_step: int = 0
    """Save a checkpoint and stop at this step (0 = never); the schedule still spans max_steps."""
    compile: bool | None = None
    """torch.compile the model (through DeepSpeed's ``engine.compile``); null = on with CUDA, off on CPU, where fp32
    gains nothing and bf16 gains less than the first compile costs a short run (docs/benchmarks.md, torch.compile)."""
    slow_rank_factor: float = 1.0
    """A simulated straggler (llmtrain-compare's scenarios): the last compute rank (sync: the last rank; async: the
    last worker) takes this many times longer per micro-batch, sleeping factor - 1 times its measured compute time
    after each. 1 = no straggler."""

    def __post_init__(self) -> None:
        problems = []
        if not 1.0 <= self.slow_rank_factor <= 1000.0:  # also refuses nan
            problems.append(f"train.slow_rank_factor={self.slow_rank_factor} must be between 1 and 1000")
        problems += bounded_each("train.", self, {
            "max_steps": (1, MAX_COUNT), "global_batch_size": (1, 1 << 24), "micro_batch_size": (1, 1 << 16),
            "log_every": (1, MAX_COUNT), "keep_checkpoints": (1, MAX_COUNT), "max_nonfinite_steps": (1, MAX_COUNT),
            "eval_every": (0, MAX_COUNT), "eval_windows": (0, MAX_COUNT), "checkpoint_every": (0, MAX_COUNT),
            "stop_at_step": (0, MAX_COUNT), "subset_tokens": (0, MAX_COUNT), "seed": (0, MAX_SEED)})
        if self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            problems.append(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size={self.micro_batch_size}")
        raise_problems(problems, "train")


@dataclass(kw_only=True)
class DistConfig:
    """Data parallelism under DeepSpeed ZeRO, and tensor or sequence parallelism: world = dp x tp x sp."""

    zero_stage: int = 0
    """ZeRO stage: 0 (plain data parallel) | 1 (optimizer states sharded) | 2 (+ gradients) | 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the update) on the CPU; needs zero_stage >= 1."""
    offload_params: bool = False
    """Keep parameters on the CPU; needs zero_stage = 3."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (memory for compute)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, gloo otherwise) | nccl | gloo."""
    timeout_s: int = 600
    """Collective timeout: a lost rank ends the job after this many seconds instead of hanging."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Merged over the generated DeepSpeed config: +dist.deepspeed_overrides.zero_optimization.overlap_comm=true."""
    tensor_parallel: int = 1
    """Ranks that split each attention and MLP matrix (DeepSpeed AutoTP); with ZeRO 0-2 on the data-parallel rest."""
    sequence_parallel: int = 1
    """Ranks that split every sequence, T / N positions each, exchanging heads around attention (DeepSpeed
    Ulysses); with ZeRO 0-3."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded("dist.tensor_parallel", self.tensor_parallel, 1, 1 << 16)
        problems += bounded("dist.sequence_parallel", self.sequence_parallel, 1, 1 << 16)
        if self.tensor_parallel > 1 and self.sequence_parallel > 1:
            problems.append("dist.tensor_parallel and dist.sequence_parallel do not combine yet: use one of them")
        if self.tensor_parallel > 1 and self.zero_stage == 3:
            problems.append("dist.tensor_parallel>1 combines with dist.zero_stage=0|1|2 (ZeRO-3 already splits the "
                            "weights; use it or dist.sequence_parallel)")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"dist.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage < 1:
            problems.append("dist.offload_optimizer=true needs dist.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            problems.append("dist.offload_params=true needs dist.zero_stage=3")
        if self.backend not in ("auto", "nccl", "gloo"):
            problems.append(f"dist.backend={self.backend} must be auto, nccl or gloo")
        problems += bounded("dist.timeout_s", self.timeout_s, 1, MAX_TIMEOUT_S)
        raise_problems(problems, "dist")


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    mode: WandbMode = WandbMode.disabled
    """online (needs `wandb login`) | offline (synced later with `wandb sync`) | disabled."""
    project: str = "llmtrain"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); None = your default."""
    name: str | None = None
    """Run name; None = the name of run.dir."""
    group: str | None = None
    """Run group, e.g. to compare several runs."""


@dataclass(kw_only=True)
class PSConfig:
    """The parameter-server mode (mode=async_ps): the first num_servers ranks serve, the others compute."""

    num_servers: int = 1
    """Parameter servers; the model's tensors are split among them, balanced by size."""
    max_staleness: int = 0
    """Bound on asynchrony: a worker more than this many updates ahead of the slowest live worker waits at
    its pull (stale-synchronous parallel); 0 = no bound."""
    staleness_lr: bool = False
    """Divide the learning rate of each update by its staleness (Zhang et al. 2016)."""
    timeout_s: int = 60
    """A pull or push that takes longer fails the worker (a lost server ends the job within this time)."""
    push_every: int = 1
    """Downpour's n_push: a worker sums the gradients of this many local steps (each global_batch_size / workers
    sequences) and pushes them as one update of that larger batch."""
    fetch_every: int = 1
    """Downpour's n_fetch: a worker pulls fresh weights every this many local steps and computes on the ones it
    holds in between."""
    overlap: bool = False
    """Pull the next weights and push the last gradient in the background while the next local step computes (at
    most one pull and one push in flight): every update is then at least one version stale."""
    transport: Transport = Transport.tcp
    """How pulls and pushes travel. tcp: torch.distributed.rpc over TensorPipe's libuv TCP transport (event-driven:
    a waiting process sleeps) | auto: TensorPipe's own pick (shared memory within a host, InfiniBand where there is
    one, else TCP); its shared-memory reactor thread busy-polls, taking a core from every process | grpc: gRPC, with
    no group membership to break: workers may be lost and others join (ps.join) while the job runs."""
    join: bool = False
    """Start this process as one more worker of a job that is running (ps.transport=grpc) in the same run.dir,
    whatever its launcher rank; it is leased work like the job's own workers, and a stop signal makes it leave."""

    def __post_init__(self) -> None:
        problems = []
        problems += bounded_each("ps.", self, {
            "num_servers": (1, 1 << 16), "max_staleness": (0, MAX_COUNT), "timeout_s": (1, MAX_TIMEOUT_S),
            "push_every": (1, 1 << 20), "fetch_every": (1, 1 << 20)})
        if self.join and self.transport != Transport.grpc:
            problems.append(f"ps.join=true needs ps.transport=grpc (the job's too): TensorPipe's group takes no "
                            f"process after it started (ps.transport={self.transport.value})")
        raise_problems(problems, "ps")


@dataclass(kw_only=True)
class RunConfig:
    """Where a training run lives."""

    dir: str = MISSING
    """Run folder: checkpoints, metrics.jsonl, config.yaml, wandb files. Re-running resumes from it."""
    resume: Resume = Resume.auto
    """auto: continue from the newest intact checkpoint in run.dir when there is one | restart: start over at step 0,
    moving the folder's earlier history (checkpoints, metrics.jsonl, ...) into run.dir/previous/<n>/ (needed once
    every checkpoint is damaged)."""

    def __post_init__(self) -> None:
        raise_problems(nonempty("run.dir", self.dir, "give the run folder, run.dir=runs/<name>"), "run")


@dataclass(kw_only=True)
class TrainConfig:
    """Root of ``llmtrain-train``."""

    data: DataConfig = field(default_factory=DataConfig)
    """The prepared dataset (prepared first, from these settings, when data.dir holds none)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model architecture."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """The training loop."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Data, tensor and sequence parallelism."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb logging."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run folder."""
    precision: Precision = Precision.bf16
    """fp32 | bf16 | fp16 (fp16 needs CUDA; dynamic loss scaling)."""
    mode: Mode = Mode.sync
    """sync (DeepSpeed ZeRO, every rank a data-parallel replica) | async_ps (workers and parameter servers)."""
    ps: PSConfig = field(default_factory=PSConfig)
    """The parameter-server mode's settings."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode == Mode.async_ps and self.precision == Precision.fp16:
            problems.append("mode=async_ps runs in fp32 or bf16 (fp16 would need loss scaling across workers, "
                            "which it does not have): use precision=bf16")
        if self.mode != Mode.async_ps and self.ps.join:
            problems.append("ps.join=true adds a worker to a parameter-server job: it needs mode=async_ps")
        if self.dist.offload_optimizer and self.optim.name == OptimizerName.sgd:
            problems.append("dist.offload_optimizer=true works with optim.name=adamw only (DeepSpeed's CPU Adam)")
        if self.model.vocab_size and self.model.vocab_size < 260:
            problems.append(f"model.vocab_size={self.model.vocab_size} is below the tokenizer's minimum of 260")
        if self.data.mix is not None and self.train.subset_tokens:
            problems.append("train.subset_tokens restricts one data.dir; it does not combine with data.mix")
        window = self.model.block_size + 1
        if 0 < self.train.subset_tokens < window:
            problems.append(f"train.subset_tokens={self.train.subset_tokens} is less than one window of "
                            f"model.block_size+1 = {window} tokens (0 = the whole split)")
        if self.data.mix is None:
            problems += nonempty("data.dir", self.data.dir, "give a prepared folder, data.dir=<folder>, or data.mix")
        problems += parallel_problems(self.model, self.dist, self.mode)
        if self.dist.tensor_parallel > 1 and self.dist.zero_stage == 0 and self.precision != Precision.fp32:
            # Measured on `tiny`, tensor parallel 2 in bf16: DeepSpeed's ZeRO-0 bf16 optimizer reported (and clipped
            # at) a gradient norm of 0.80 where the 1-process norm is 0.91; at ZeRO-1 it matches.
            problems.append(f"dist.tensor_parallel={self.dist.tensor_parallel} with precision={self.precision.value} "
                            "needs dist.zero_stage=1 or 2: DeepSpeed's ZeRO-0 mixed-precision optimizer misses "
                            "the other ranks' slices in its gradient norm")
        raise_problems(problems, "training")


def parallel_problems(model: ModelConfig, dist: DistConfig, mode: Mode = Mode.sync) -> list[str]:
    """What a tensor- or sequence-parallel degree must divide, and where it does not apply (one line each). Checked
    with the config, and again on a model.init_from model, whose sizes come from its folder."""
    problems = []
    for axis, degree in (("tensor_parallel", dist.tensor_parallel), ("sequence_parallel", dist.sequence_parallel)):
        if degree == 1:
            continue
        if mode == Mode.async_ps:
            problems.append(f"dist.{axis}={degree} applies to mode=sync; the parameter servers' workers each hold "
                            "the whole model")
        if model.arch != Arch.gpt:
            problems.append(f"dist.{axis}={degree} splits the Transformer's layers; model.arch={model.arch.value} "
                            "trains data parallel only")
            continue
        heads = [("model.n_head", model.n_head)] + ([("model.n_kv_head", model.kv_heads)]
                                                    if model.kv_heads != model.n_head else [])
        for name, size in heads:
            if size % degree:
                problems.append(f"dist.{axis}={degree} does not divide {name}={size}: each rank takes whole heads")
        if axis == "tensor_parallel" and model.hidden % degree:
            problems.append(f"dist.tensor_parallel={degree} does not divide the MLP width {model.hidden}")
        if axis == "sequence_parallel" and model.block_size % degree:
            problems.append(f"dist.sequence_parallel={degree} does not divide model.block_size={model.block_size}: "
                            "each rank takes an equal slice of every sequence")
    return problems


@dataclass(kw_only=True)
class CompareSection:
    """What ``llmtrain-compare`` runs side by side."""

    dir: str = MISSING
    """Output folder: one run folder per mode, the plots and the table."""
    compute_ranks: int = 2
    """Ranks that compute gradients in each mode: sync data-parallel ranks = async workers."""
    staleness_lr: bool = True
    """Also run async with ps.staleness_lr=true."""
    slow_rank_factor: float = 1.0
    """A straggler scenario: above 1, every mode runs a second time with one compute rank this many times slower per
    micro-batch (train.slow_rank_factor), and the plots show both scenarios side by side."""

    def __post_init__(self) -> None:
        problems = nonempty("compare.dir", self.dir, "give the output folder, compare.dir=runs/<name>")
        problems += bounded("compare.compute_ranks", self.compute_ranks, 1, 1 << 16)
        if not 1.0 <= self.slow_rank_factor <= 1000.0:  # also refuses nan
            problems.append(f"compare.slow_rank_factor={self.slow_rank_factor} must be between 1 and 1000")
        raise_problems(problems, "compare")


@dataclass(kw_only=True)
class CompareConfig(TrainConfig):
    """Root of ``llmtrain-compare``: a training config, run in both modes, plus what to compare."""

    compare: CompareSection = field(default_factory=CompareSection)
    """The comparison's settings."""


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


def to_plain(obj: Any) -> Any:
    """A dataclass tree as JSON-ready builtins (enums become their values)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


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
