#!/usr/bin/env bash
# A Hydra sweep (multirun) on Slurm: one job per setting, submitted by Hydra's Submitit launcher plugin
# (hydra-submitit-launcher); run it on the login node, it waits for the jobs and reports each one. E.g.:
#   bash slurm/sweep.sh data.dir=data/stdlib model=small optim.lr=1e-3,3e-3,1e-2 train.max_steps=2000
# Arguments are Hydra overrides; a comma list sweeps. Each job trains in $SWEEP_DIR/<job number> (its run.dir)
# and its Slurm logs are in $SWEEP_DIR/.submitit/. With TASKS_PER_NODE > 1 each job runs that many ranks
# (srun tasks; llmtrain reads the ranks from Slurm). Requeue on pre-emption/time limit is submitit's own
# (SIGUSR2 120 s before the limit); the requeued job resumes from its newest checkpoint.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
# ---- resources and environment: edit, or set them in the environment ----------------------------------------
PARTITION=${PARTITION:-}                   # empty: the cluster's default partition
TIME_MIN=${TIME_MIN:-240}                  # per job, in minutes
NODES=${NODES:-1}
TASKS_PER_NODE=${TASKS_PER_NODE:-1}        # ranks per node (one per GPU)
GPUS_PER_NODE=${GPUS_PER_NODE:-0}
CPUS_PER_TASK=${CPUS_PER_TASK:-1}
MEM_GB=${MEM_GB:-0}                        # 0: Slurm's default
SWEEP_DIR=${SWEEP_DIR:-runs/sweep-$(date +%Y%m%d-%H%M%S)}
PY=${LLMTRAIN_PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
# --------------------------------------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
"$PY" -c "import hydra_plugins.hydra_submitit_launcher" 2>/dev/null || {
  echo "slurm/sweep.sh: error: Hydra's Submitit launcher is not installed: $PY -m pip install -e '.[slurm]'" >&2; exit 2; }
exec "$PY" -m llmtrain.cli.train --multirun hydra/launcher=submitit_slurm \
  "hydra.launcher.partition=${PARTITION:-null}" "hydra.launcher.timeout_min=$TIME_MIN" \
  "hydra.launcher.nodes=$NODES" "hydra.launcher.tasks_per_node=$TASKS_PER_NODE" \
  "hydra.launcher.gpus_per_node=$GPUS_PER_NODE" "hydra.launcher.cpus_per_task=$CPUS_PER_TASK" \
  "hydra.launcher.mem_gb=$MEM_GB" "hydra.sweep.dir=$SWEEP_DIR" "hydra.launcher.submitit_folder=$SWEEP_DIR/.submitit/%j" \
  'run.dir=${hydra:sweep.dir}/${hydra:job.num}' "$@"
