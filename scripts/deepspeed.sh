#!/usr/bin/env bash
# Start llmtrain with the deepspeed launcher over a Slurm allocation (run it once, from the batch script).
# The hostfile is built from the allocation ("<node> slots=<GPUs per node>"); arguments are Hydra overrides:
#   bash scripts/deepspeed.sh data.dir=data/stdlib run.dir=runs/ds model=gpt2-124m precision=bf16
# DS_LAUNCHER picks how deepspeed reaches the other nodes (default slurm: srun; pdsh and openmpi work too).
# Outside Slurm it runs on this node alone (NPROC_PER_NODE processes, default: the GPUs, or 1).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
VENV_PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"  # the checkout's venv (scripts/setup.sh), if any
PY=${LLMTRAIN_PYTHON:-$([ -x "$VENV_PY" ] && echo "$VENV_PY" || echo python)}
BIN=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  eval "$("$PY" -m llmtrain.distributed.slurm env)"
  HOSTFILE=${HOSTFILE:-${TMPDIR:-/tmp}/llmtrain-hostfile-${SLURM_JOB_ID}}
  "$PY" -m llmtrain.distributed.slurm hostfile "$HOSTFILE"
  # The layout checked first (llmtrain-train --check): a refusal is one line and exit 2, before the launcher starts.
  "$PY" -m llmtrain.cli.train --check --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" "$@" || exit $?
  LAUNCHER=${DS_LAUNCHER:-slurm}
  NO_SSH=(); [ "$LAUNCHER" = slurm ] && NO_SSH=(--no_ssh_check)  # srun reaches the nodes; ssh is not needed
  # The console script, not --module llmtrain.cli.train: DeepSpeed's slurm launcher (SlurmRunner.get_cmd, 0.19.8)
  # drops --module and runs `python -u llmtrain.cli.train`, a file that is not there (a one-node allocation takes
  # DeepSpeed's local launcher, which keeps --module).
  exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --launcher "$LAUNCHER" "${NO_SSH[@]}" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$BIN/llmtrain-train" "$@"
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)')}
"$PY" -m llmtrain.cli.train --check --nproc_per_node "$NPROC_PER_NODE" --nnodes 1 "$@" || exit $?
exec "$BIN/deepspeed" --num_gpus "$NPROC_PER_NODE" --master_port "${MASTER_PORT:-29500}" \
  --module llmtrain.cli.train "$@"
