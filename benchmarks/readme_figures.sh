#!/usr/bin/env bash
# Re-run every command whose figures depend on the training data order (docs/benchmarks.md: the quick-start demo,
# sync vs async, DiLoCo, the two baseline tables), one after another on an otherwise idle machine, and print the
# figures docs/benchmarks.md and the README quote. About 3 hours on 2 CPU cores. Run from a set-up checkout (bash
# scripts/setup.sh):
#   bash benchmarks/readme_figures.sh [OUT]        # OUT: where the runs go (default: runs/readme-<date>)
# Steps that already finished (their run folder holds a final checkpoint) are skipped on a re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/readme-$(date +%Y%m%d)}
mkdir -p "$OUT"
BIN=.venv/bin
LOG="$OUT/figures.txt"
note() { echo "$*" | tee -a "$LOG"; }
timed() {  # timed NAME CMD...: run once, log its output and wall seconds
    local name=$1; shift
    if [[ -f "$OUT/$name.done" ]]; then note "== $name: done before, skipped"; return; fi
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    note "== $name: $((SECONDS - start)) s"
    touch "$OUT/$name.done"
}
val_lines() { grep -E "val_loss|vs unigram" "$OUT/$1.log" | sed -E 's/^\[[^]]*\] //' | tee -a "$LOG"; }
speed() { grep -oE "[0-9,]+ tokens/s" "$OUT/$1.log" | tr -d ', tokens/s' |
          awk '{s += $1; n++} END {if (n) printf "mean %.0f tokens/s over %d logged intervals\n", s / n, n}' | tee -a "$LOG"; }
torchrun2() { "$BIN/torchrun" --standalone --nproc_per_node 2 -m llmtrain.cli.train "$@"; }
evaluate() {  # evaluate RUN...: every validation window of each run's last checkpoint
    for run in "$@"; do
        timed "eval-$run" "$BIN/llmtrain-eval" run.dir="$OUT/$run"
        tail -n 2 "$OUT/eval-$run.log" | tee -a "$LOG"
    done
}
ngram() {  # ngram ORDER TOKENS: the n-gram fitted on the first TOKENS training tokens (0: all of them)
    timed "ngram$1-$2" "$BIN/llmtrain-ngram" data.dir=data/stdlib order="$1" block_size=128 train_tokens="$2"
    tail -n 2 "$OUT/ngram$1-$2.log" | tee -a "$LOG"
}

note "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD) on $(lscpu | sed -n 's/^Model name: *//p'), \
$(grep -o -w -E 'avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
$BIN/llmtrain-prepare data=stdlib data.dir=data/stdlib >/dev/null

# Order: the runs whose speed the figures quote most closely (the demo, the comparison) come last.
# Same training data (docs/benchmarks.md, "Same training data"): 8 passes over 262,144 tokens; the GPT on one thread.
timed smalldata-gpt env OMP_NUM_THREADS=1 "$BIN/llmtrain-train" experiment=small_data model=mini \
    run.dir="$OUT/smalldata-gpt"
val_lines smalldata-gpt
timed smalldata-lstm torchrun2 experiment=small_data model=lstm run.dir="$OUT/smalldata-lstm"
val_lines smalldata-lstm
evaluate smalldata-gpt smalldata-lstm
ngram 3 262144
ngram 4 262144

# One pass, equal tokens (docs/benchmarks.md, "One pass"): 1,000 steps each, and the n-grams at the same token counts.
timed baselines-gpt torchrun2 experiment=baselines run.dir="$OUT/baselines-gpt"
val_lines baselines-gpt
timed baselines-lstm torchrun2 experiment=baselines model=lstm run.dir="$OUT/baselines-lstm"
val_lines baselines-lstm
evaluate baselines-gpt baselines-lstm
for tokens in 409600 512000 1024000 1536000 2048000 0; do
    ngram 3 $tokens
    ngram 4 $tokens
done
# The quick-start demo (docs/benchmarks.md, "Quick-start demo"): 200 steps of `small`, ZeRO-2, 2 ranks.
timed demo torchrun2 experiment=demo run.dir="$OUT/demo"
val_lines demo; speed demo
evaluate demo  # the demo's row of the one-pass table (all windows)

# Sync vs async (docs/benchmarks.md, "Sync vs async"), fp32 and bf16.
timed compare-fp32 "$BIN/llmtrain-compare" experiment=demo compare.dir="$OUT/compare"
cat "$OUT/compare/table.md" | tee -a "$LOG"
timed compare-bf16 "$BIN/llmtrain-compare" experiment=demo precision=bf16 compare.dir="$OUT/compare-bf16"
cat "$OUT/compare-bf16/table.md" | tee -a "$LOG"

# DiLoCo beside sync ZeRO-2 and Downpour (docs/benchmarks.md, "Async: DiLoCo"), in both round modes, with the
# outer learning rate and warm-up tuned there.
for rounds in true false; do
    timed "compare-diloco-$rounds" "$BIN/llmtrain-compare" experiment=demo precision=bf16 train.max_steps=256 \
        train.eval_every=64 train.checkpoint_every=128 optim.warmup_steps=128 ps.outer_lr=1.0 ps.outer_momentum=0 \
        compare.staleness_lr=false "compare.inner_steps=[4,16,64]" compare.sync_rounds=$rounds \
        compare.dir="$OUT/compare-diloco-$rounds"
    cat "$OUT/compare-diloco-$rounds/table.md" | tee -a "$LOG"
done

note "figures: $LOG"
