"""The one map from a precision name (the values of ``config.Precision`` and ``config.WeightDtype``) to a torch
dtype."""

from __future__ import annotations

from enum import Enum

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str | Enum) -> torch.dtype:
    """``torch_dtype(Precision.bf16) == torch_dtype("bf16") == torch.bfloat16``."""
    return DTYPES[name.value if isinstance(name, Enum) else name]
