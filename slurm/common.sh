# Sourced by the slurm/*.sbatch templates (not submitted itself): run one job step, then requeue the job if
# llmtrain stopped on a pre-emption signal. Usage inside a template:  llmtrain_step <srun options> -- <command>
# Needs: LLMTRAIN_HOME (the checkout), PY (its python), TRAIN_ARGS (the Hydra overrides, an array).

# The run folder, from the same overrides the job trains with (so experiment=... files count too).
llmtrain_run_dir() {
  "$PY" -m llmtrain.cli.train "${TRAIN_ARGS[@]}" --cfg job --resolve --package run 2>/dev/null \
    | sed -n 's/^dir: *//p'
}

# The layout checked before any rank starts (llmtrain-train --check): a refusal is one line and exit 2, with no
# srun step and no launcher traceback. Usage: llmtrain_check <nproc per node> <nodes, or MIN:MAX>
llmtrain_check() {
  "$PY" -m llmtrain.cli.train --check --nproc_per_node "$1" --nnodes "$2" "${TRAIN_ARGS[@]}"
}

llmtrain_step() {
  local srun_opts=() rc run_dir
  while [ "$#" -gt 0 ] && [ "$1" != -- ]; do srun_opts+=("$1"); shift; done
  shift
  run_dir=$(llmtrain_run_dir)
  if [ -z "$run_dir" ]; then
    echo "llmtrain: error: cannot read run.dir from the overrides: ${TRAIN_ARGS[*]}" >&2
    return 2
  fi
  echo "llmtrain: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run.dir=$run_dir" >&2
  # --kill-on-bad-exit: a failed task ends the whole step (no hang until the time limit) and srun names it.
  srun "${srun_opts[@]}" "$@"
  rc=$?
  if [ "$rc" = 0 ] && [ -f "$run_dir/PREEMPTED" ]; then
    echo "llmtrain: stopped on a signal with a checkpoint ($(cat "$run_dir/PREEMPTED")); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  if [ "$rc" != 0 ] && [ -n "${MIN_NODES:-}" ] && llmtrain_finished "$run_dir"; then  # elastic: srun names the lost
    echo "llmtrain: a node was lost during the job (srun: exit code $rc); the nodes left finished it" >&2  # task
    return 0
  fi
  [ "$rc" = 0 ] || echo "llmtrain: error: job step failed with exit code $rc (see the lines above for the rank)" >&2
  return "$rc"
}

# Whether the run in $1 has finished: its newest complete checkpoint is at its train.max_steps.
llmtrain_finished() {
  local max_steps newest
  max_steps=$("$PY" -m llmtrain.cli.train "${TRAIN_ARGS[@]}" --cfg job --resolve --package train 2>/dev/null \
    | sed -n 's/^max_steps: *//p')
  newest=$(find "$1/checkpoints" -maxdepth 2 -name COMPLETE.json 2>/dev/null | sed -n 's|.*/step_0*\([0-9][0-9]*\)/COMPLETE.json|\1|p' \
    | sort -n | tail -1)
  [ -n "$max_steps" ] && [ -n "$newest" ] && [ "$newest" -ge "$max_steps" ]
}
