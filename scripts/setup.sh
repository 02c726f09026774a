#!/usr/bin/env bash
# Set up llmtrain in ./.venv (idempotent; a second run takes seconds):
#   bash scripts/setup.sh
# PyTorch is pinned to 2.13.0. On a machine without a GPU, pip takes the CPU build of that release where
# pip is configured to find it; a bare `pip install torch` would pull a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_quiet() {  # pip's notes about unreadable extra index folders are noise here
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
.venv/bin/python -c "import torch" 2>/dev/null || pip_quiet "$TORCH_SPEC"
pip_quiet -e ".[dev]"
.venv/bin/python - <<'PY'
import torch, deepspeed, datasets, sentencepiece, hydra, wandb  # noqa: F401  (fails loudly if an install broke)
print(f"llmtrain set up in .venv: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), "
      f"deepspeed {deepspeed.__version__}, datasets {datasets.__version__}", flush=True)
PY
# Without CUDA, DeepSpeed compiles its shared-memory collective op the first time a process group starts (about
# half a minute), and its CPU Adam (dist.offload_optimizer=true) the first time a run offloads (about 45 s). Build
# them here, once: ranks that start together would otherwise all build them, and one killed while it holds the build
# lock leaves every later start waiting on that lock. Cached under ~/.cache/torch_extensions.
.venv/bin/python - <<'PY'
import torch
if not torch.cuda.is_available():
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder import CPUAdamBuilder
    build_shm_op()
    CPUAdamBuilder().load()
PY
