#!/usr/bin/env bash
# Start llmtrain on this node with torchrun (c10d rendezvous); run it once per node. Arguments are Hydra
# overrides, passed through untouched:
#   bash scripts/torchrun.sh data.dir=data/stdlib run.dir=runs/z2 dist.zero_stage=2          # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 bash scripts/torchrun.sh ...  # node 0 of 2
#   srun --ntasks-per-node=1 bash scripts/torchrun.sh ...                                    # inside sbatch
#   NPROC_PER_NODE=2 bash scripts/torchrun.sh ... dist.pipeline_parallel=2                   # 2 pipeline stages
#   NNODES=1:2 MAX_RESTARTS=3 NODE_RANK=... bash scripts/torchrun.sh ...   # elastic: goes on with the nodes left
# Elastic (NNODES=MIN:MAX, MAX_RESTARTS>0): when a node is lost, torchrun's agents re-form the job on the nodes
# left (at least MIN) and every rank resumes from the newest complete checkpoint at the new world size; a node
# that comes back joins at the next restart. Node 0 hosts the rendezvous: the job lives as long as node 0 does.
# Under Slurm, NNODES, NODE_RANK, MASTER_ADDR (the first node of the allocation), MASTER_PORT (from the job
# id) and NPROC_PER_NODE (the node's GPUs) come from the allocation; any of them set in the environment wins.
# Also: LLMTRAIN_PYTHON (default: the checkout's .venv, else python), RDZV_ID, RDZV_CONF (more of torchrun's --rdzv-conf,
# e.g. last_call_timeout=5), LOCAL_ADDR, GLOO/NCCL/TP_SOCKET_IFNAME.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
VENV_PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"  # the checkout's venv (scripts/setup.sh), if any
PY=${LLMTRAIN_PYTHON:-$([ -x "$VENV_PY" ] && echo "$VENV_PY" || echo python)}
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then eval "$("$PY" -m llmtrain.distributed.slurm env)"; fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)')}
# This node's address towards the rendezvous host, and the interface gloo/NCCL/TensorPipe should use:
# guessing from the hostname is how multi-node jobs end up listening on the wrong network and hang.
eval "$("$PY" -m llmtrain.distributed.slurm net "$MASTER_ADDR")"
IS_HOST=false; [ "$NODE_RANK" = 0 ] && IS_HOST=true  # node 0 serves the rendezvous, whatever its hostname says
# The layout checked first (llmtrain-train --check): a refusal is one line and exit 2, before torchrun starts (its
# own report of a failed rank is a traceback). Node 0 prints the grid and predicted memory; the others check quietly.
if [ "$NODE_RANK" = 0 ]; then CHECK_OUT=/dev/stdout; else CHECK_OUT=/dev/null; fi
"$PY" -m llmtrain.cli.train --check --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" "$@" >"$CHECK_OUT" \
  || exit $?
# Elastic: each round of the rendezvous publishes its own bootstrap store. With torch's shared store (the default), the
# agent of node 0 publishes MASTER_ADDR only in the first round, and a node that joins later waits for it forever
# (torch 2.13: DynamicRendezvousHandler.next_rendezvous).
if [ "${MAX_RESTARTS:-0}" != 0 ]; then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi
# torchrun's agent ignores SIGUSR1 (an ignored signal stays ignored across exec), so Slurm's pre-emption
# signal, sent to every process of the step, reaches the trainers (which checkpoint) without killing the agent.
trap '' USR1
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-llmtrain}}" \
  --rdzv-conf "is_host=$IS_HOST${RDZV_CONF:+,$RDZV_CONF}" --local-addr "$LOCAL_ADDR" --max-restarts "${MAX_RESTARTS:-0}" \
  -m llmtrain.cli.train "$@"
