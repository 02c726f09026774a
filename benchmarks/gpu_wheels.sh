#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine without network access, built once on a machine
# with PyPI into .whl/ (ignored by git). A GPU image with torch, transformers, sentencepiece, safetensors, pyarrow,
# pandas, fsspec, huggingface-hub, tqdm and numpy lacks DeepSpeed, Hydra/OmegaConf, datasets, pydantic and their
# small dependencies: those are built or downloaded here, at the versions this checkout's .venv runs.
#   bash benchmarks/gpu_wheels.sh && du -sh .whl      # a few tens of MiB, copied with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
pip=(.venv/bin/python -m pip)
version() { "${pip[@]}" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
binary=()
for name in hydra-core omegaconf datasets dill multiprocess xxhash pydantic pydantic-core annotated-types \
            typing-inspection hjson; do
    binary+=("$name==$(version "$name")")
done
# The GPU machine runs Python 3.12 on x86-64 Linux.
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${binary[@]}"
# Published as source archives only: build their pure-Python wheels here (DeepSpeed compiles no op now; the
# ones it needs are built just in time there).
DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation -w .whl \
    "deepspeed==$(version deepspeed)" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -1 .whl
