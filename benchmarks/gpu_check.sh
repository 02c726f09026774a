#!/usr/bin/env bash
# A one-GPU smoke test and benchmark (about 8 minutes on one H200-class GPU): tests/gpu, then tokens/s and MFU
# (against the data sheet's bf16 peak) of gpt2-124m and 350m in bf16, eager and train.compile=true, as one table.
# Then a long-context run on one device (predicted and measured peak), the tensor- and sequence-parallel layouts
# where there are 2 devices (or on 2 CPU ranks), and llmtrain's fp32 training step against the simplest peer's
# (benchmarks/_alternate.py), alternated.
#   bash benchmarks/gpu_check.sh        # results in $OUT (default /tmp/gpu-check): results.jsonl, table.md, logs
# On a GPU machine without network access and without a .venv, it installs the wheels of .whl/ (built beforehand
# on a machine with PyPI: bash benchmarks/gpu_wheels.sh) and the checkout itself. Without CUDA (~3 minutes) it uses
# the checkout's .venv, the GPU tests skip, and the same table is measured for `tiny` at block 128 on the CPU: a
# smoke run of every step of the script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" && rm -f "$OUT/results.jsonl"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_DATASETS_DISABLE_PROGRESS_BARS=1
log() { echo "[$(date +%T)] $*"; }

if [ -x .venv/bin/python ]; then  # a checkout set up by scripts/setup.sh
    py=.venv/bin/python
else  # a GPU machine without network: the checkout and its .whl/ wheels
    log "install: the carried wheels and llmtrain itself (no network there)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    py=python3
fi
bin=$(dirname "$($py -c 'import sys; print(sys.executable)')")
if $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    block=1024 steps=30 limit=110 specs=("gpt2-124m 16" "350m 8") long=16384 prec=bf16
else
    log "no CUDA: a CPU smoke run of the same steps"
    block=128 steps=12 limit=240 specs=("tiny 8") long=1024 prec=fp32
fi
$py -c "import torch, deepspeed, datasets, hydra; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 1

log "prepare the embedded default corpus"
timeout 180 "$bin/llmtrain-prepare" data=stdlib data.dir=/tmp/data/stdlib data.num_proc=8 2>&1 | tail -2

log "tests/gpu"
timeout 240 $py -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/tests_gpu.log" | tail -3

log "throughput: bf16, one device, block $block, $steps steps (the first third, which holds the compile, left out)"
for spec in "${specs[@]}"; do
    read -r model micro <<<"$spec"
    for compiled in false true; do
        run=/tmp/runs/$model-$compiled
        timeout "$limit" "$bin/llmtrain-train" data.dir=/tmp/data/stdlib run.dir="$run" model="$model" precision=bf16 \
            model.block_size="$block" train.micro_batch_size="$micro" train.global_batch_size="$micro" \
            train.max_steps="$steps" train.log_every=$((steps / 3)) train.eval_every=0 train.eval_windows=8 \
            train.checkpoint_every=0 run.resume=restart train.compile="$compiled" >"$OUT/train_${model}_$compiled.log" 2>&1 \
            || { log "$model compile=$compiled failed: $(tail -1 "$OUT/train_${model}_$compiled.log")"; continue; }
        $py - "$run" "$model" "$micro x $block" "$compiled" >>"$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if '"tokens_per_s"' in l][1:]
print(json.dumps({"model": sys.argv[2], "batch": sys.argv[3], "compiled": sys.argv[4] == "true",
                  "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
                  "mfu": sum(r["mfu"] for r in rows) / len(rows), "peak_gib": max(r["peak_mem_gb"] for r in rows)}))
PY
    done
done
log "long context on one device: small, RoPE, activation checkpointing, block $long; predicted against measured peak"
timeout "$limit" "$bin/llmtrain-train" data.dir=/tmp/data/stdlib run.dir=/tmp/runs/long-context model=small \
    model.pos=rope model.block_size="$long" precision="$prec" dist.activation_checkpointing=true \
    train.micro_batch_size=1 train.global_batch_size=1 train.max_steps=3 train.log_every=1 train.eval_every=0 \
    train.eval_windows=2 train.checkpoint_every=0 run.resume=restart >"$OUT/long_context.log" 2>&1 \
    && grep -o "memory per rank: predicted.*" "$OUT/long_context.log" | tee "$OUT/long_context.txt" \
    || log "long context failed: $(tail -1 "$OUT/long_context.log")"
devices=$($py -c "import torch; print(torch.cuda.device_count())")
if [ "$devices" -ge 2 ] || [ "$devices" = 0 ]; then  # the tensor- and sequence-parallel layouts need 2 devices
    for axis in tensor_parallel sequence_parallel; do
        log "dist.$axis=2 on 2 ranks: losses beside the 1-rank run's (tests/integration/test_parallel.py on a CPU)"
        timeout "$limit" "$bin/torchrun" --standalone --nproc_per_node 2 -m llmtrain.cli.train \
            data.dir=/tmp/data/stdlib run.dir=/tmp/runs/$axis model="${specs[0]%% *}" precision="$prec" \
            dist.$axis=2 dist.zero_stage=1 model.block_size="$block" train.micro_batch_size=4 \
            train.global_batch_size=4 train.max_steps=10 train.log_every=5 train.eval_every=0 train.eval_windows=8 \
            train.checkpoint_every=0 run.resume=restart >"$OUT/layout_$axis.log" 2>&1 \
            && grep -E "tensor x|step 10/" "$OUT/layout_$axis.log" | tail -2 || log "$axis failed: $(tail -1 "$OUT/layout_$axis.log")"
    done
fi
model=${specs[0]%% *} micro=${specs[0]##* }
log "fp32 eager, $model: llmtrain's training step against the simplest peer's, alternated (benchmarks/_alternate.py)"
timeout "$limit" $py benchmarks/_alternate.py --steps "$steps" -- data.dir=/tmp/data/stdlib model="$model" \
    precision=fp32 train.compile=false model.block_size="$block" train.micro_batch_size="$micro" \
    train.global_batch_size="$micro" train.eval_windows=8 2>"$OUT/alternate.log" | grep "^{" | tee "$OUT/alternate.json"
$py - "$OUT/results.jsonl" <<'PY' | tee "$OUT/table.md"
import json, sys
runs = {(r["model"], r["compiled"]): r for r in map(json.loads, open(sys.argv[1]))}
print("| model | batch | eager tokens/s | eager MFU | compiled tokens/s | compiled MFU | speed-up | peak GiB |")
print("|---|---|---|---|---|---|---|---|")
for model in dict.fromkeys(m for m, _ in runs):
    e, c = runs.get((model, False)), runs.get((model, True))
    cell = lambda r: f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%}" if r else "failed | -"
    speedup = f"{c['tokens_per_s'] / e['tokens_per_s']:.2f}" if e and c else "-"
    peak = max(r["peak_gib"] for r in (e, c) if r)
    print(f"| {model} | {(e or c)['batch']} | {cell(e)} | {cell(c)} | {speedup} | {peak:.1f} |")
PY
log "done"
