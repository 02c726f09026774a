#!/usr/bin/env bash
# Start a one-node Slurm (controller + compute daemon + munge) on this machine, to try and test slurm/:
#   bash scripts/slurm_local.sh            # installs Debian's slurm-wlm and munge when missing (needs root)
#   sinfo && sbatch slurm/train.sbatch ...
#   bash scripts/slurm_local.sh stop
# Idempotent: a second call with the daemons up only checks that the node is idle. Writes /etc/slurm/slurm.conf
# only when there is none or it is this script's own (its first line says so); logs in /var/log/slurm/.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
MARK="# written by llmtrain scripts/slurm_local.sh"
CONF=/etc/slurm/slurm.conf

if [ "${1:-start}" = stop ]; then
  pkill -x slurmd || true; pkill -x slurmctld || true
  while pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null; do sleep 0.2; done
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm_local.sh: error: needs root (it installs packages and starts daemons)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge (Debian packages)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

NODE=$(hostname -s)
if [ ! -f "$CONF" ] || head -n1 "$CONF" | grep -qF "$MARK"; then
  # The node's memory as slurmd sees it; CPUs: SLURM_LOCAL_CPUS (default 4 per core), more than the machine has,
  # so that a 3-process parameter-server job or two sweep jobs fit on a 2-core test machine at once.
  MEM=$(slurmd -C | head -n1 | grep -o 'RealMemory=[0-9]*')
  CPUS=${SLURM_LOCAL_CPUS:-$(( 4 * $(nproc) ))}
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=llmtrain-local
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
# A requeued job waits out the job credential's lifetime before it may start again (Slurm's default: 120 s);
# 10 s keeps the pre-emption tests short. Starting it sooner is refused ("Job credential revoked").
AuthInfo=cred_expire=10
KillWait=15
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$CPUS $MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
fi

# munge must answer before the daemons start (they authenticate every message with it); a munged left from an
# earlier install without its socket is replaced.
if ! munge -n >/dev/null 2>&1; then
  pkill -x munged || true
  mkdir -p /run/munge && chown munge:munge /run/munge && runuser -u munge -- munged
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

# Wait until the node takes jobs (the controller needs a few seconds to register it).
for _ in $(seq 60); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case "$state" in idle|mixed|allocated) echo "slurm: node $NODE is $state" >&2; exit 0 ;; esac
  if [ "$state" = down ] || [ "$state" = drained ]; then scontrol update nodename="$NODE" state=resume || true; fi
  sleep 1
done
echo "slurm_local.sh: error: node $NODE did not come up (state: ${state:-none}); see /var/log/slurm/" >&2
exit 1
