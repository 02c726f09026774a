#!/usr/bin/env bash
# Prepare a corpus as Slurm jobs (llmtrain/data/tasks.py): a plan job (load, split, train the tokenizer), K
# tokenize tasks as a job array after it, and a merge after all of them (writes meta.json last). Run it from the
# checkout; it submits the three jobs, prints their ids and returns. E.g.:
#   bash slurm/prepare.sh 8 data=text 'data.paths=[corpus/]' data.dir=data/mine data.vocab_size=32000
# Arguments: K, then Hydra overrides (data.dir on a filesystem every node shares). Each job's resources are in
# slurm/prepare.sbatch; options for all three jobs: SBATCH_OPTS="--partition=cpu --time=2:00:00".
# A failed plan or task cancels the jobs waiting on it (the merge never runs on a partial set) and leaves no
# meta.json. Submitting the same command again redoes only what is missing: the plan and every complete task
# find their json and exit at once.
set -euo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
K=$1
shift
if ! [[ "$K" =~ ^[1-9][0-9]*$ ]]; then
  echo "slurm/prepare.sh: error: the first argument is the number of tasks K (got '$K')" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
read -r -a OPTS <<< "${SBATCH_OPTS:-}"
ARGS=("data.num_tasks=$K" "$@")
submit() {  # sbatch options... phase: the job id
  local id
  id=$(sbatch --parsable ${OPTS[@]+"${OPTS[@]}"} "${@:1:$#-1}" slurm/prepare.sbatch "${@: -1}" "${ARGS[@]}")
  echo "${id%%;*}"
}
plan=$(submit plan)
# --kill-on-invalid-dep: when a job it waits for fails, cancel this one instead of leaving it pending forever
tasks=$(submit --array="0-$((K - 1))" --dependency="afterok:$plan" --kill-on-invalid-dep=yes task)
merge=$(submit --dependency="afterok:$tasks" --kill-on-invalid-dep=yes merge)
echo "plan $plan, tasks ${tasks}_[0-$((K - 1))], merge $merge"
