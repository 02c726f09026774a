"""What every section's checks share: the caps no real run reaches, the range checks that word a problem as the
override to change, and the plain (JSON-ready) form of a config."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any

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
