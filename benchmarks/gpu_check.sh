#!/usr/bin/env bash
# The one prepared GPU check, for a short loan of one H200 (about 8 minutes): tests/gpu, then tokens/s and MFU
# (against the data sheet's bf16 peak) of gpt2-124m and 350m in bf16, printed as one table. Prepare the wheels
# here first (bash benchmarks/gpu_wheels.sh), then call the device tool with
#   command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560
# train.compile does not exist yet (issue 13): the table has an eager column only.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_DATASETS_DISABLE_PROGRESS_BARS=1
log() { echo "[$(date +%T)] $*"; }

log "install: the carried wheels and llmtrain itself (no network there)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, deepspeed, datasets, hydra; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
bin=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")

log "prepare the embedded default corpus"
timeout 120 "$bin/llmtrain-prepare" data=stdlib data.dir=/tmp/data/stdlib data.num_proc=8 2>&1 | tail -2

log "tests/gpu"
timeout 240 python3 -m pytest -q -x tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" | tail -5

log "throughput: bf16, one GPU, block 1024, 30 steps (the first 10 left out)"
rows=()
for spec in "gpt2-124m 16" "350m 8"; do
    read -r model micro <<<"$spec"
    run=/tmp/runs/$model
    timeout 150 "$bin/llmtrain-train" data.dir=/tmp/data/stdlib run.dir="$run" model="$model" precision=bf16 \
        model.block_size=1024 train.micro_batch_size="$micro" train.global_batch_size="$micro" train.max_steps=30 \
        train.log_every=10 train.eval_every=0 train.eval_windows=8 train.checkpoint_every=0 run.resume=false \
        >"$OUT/train_$model.log" 2>&1 || { tail -5 "$OUT/train_$model.log"; continue; }
    rows+=("$(python3 - "$run" "$model" "$micro" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if '"tokens_per_s"' in l][1:]
tok = sum(r["tokens_per_s"] for r in rows) / len(rows)
mfu = sum(r["mfu"] for r in rows) / len(rows)
mem = max(r["peak_mem_gb"] for r in rows)
print(f"| {sys.argv[2]} | {sys.argv[3]} x 1024 | {tok:,.0f} | {mfu:.1%} | n/a | {mem:.1f} |")
PY
)")
done
{
    echo "| model | batch | eager tokens/s | eager MFU | compiled | peak GiB |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$OUT/table.md"
log "done"
