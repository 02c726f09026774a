#!/usr/bin/env bash
# Start a local Slurm on this machine, to try and test slurm/ (needs root; installs Debian's slurm-wlm and munge
# when missing):
#   bash scripts/slurm_local.sh              # one node: this machine (controller + compute daemon + munge)
#   sinfo && sbatch slurm/train.sbatch ...
#   bash scripts/slurm_local.sh --nodes 2    # a second cluster beside it: node1 and node2, each in its own network
#                                            # namespace with its own hostname and address on a bridge
#   export SLURM_CONF=/etc/slurm/llmtrain-2nodes/slurm.conf   # sinfo, sbatch, ... then talk to the two nodes
#   bash scripts/slurm_local.sh [--nodes 2] stop
# Idempotent: a second call starts only what is missing (a killed node's slurmd, say), resumes a node that is
# down and waits until every node is idle. Writes a slurm.conf only when there is none or it is this script's own
# (its first line says so); logs in /var/log/slurm/. The two-node cluster's nodes see /etc/hosts of their own
# (node names and the controller's address); the machine's /etc/hosts is left alone. Both nodes share this
# machine's cores: give a job's ranks one thread each (--export=ALL,OMP_NUM_THREADS=1).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
MARK="# written by llmtrain scripts/slurm_local.sh"
NODES=1 ACTION=start
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:-}; shift 2 || shift ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    start|stop) ACTION=$1; shift ;;
    *) echo "slurm_local.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$NODES" in 1|2) ;; *) echo "slurm_local.sh: error: --nodes is 1 or 2 (got '$NODES')" >&2; exit 2 ;; esac

# The two-node cluster: its own controller port, spool, state and pid paths (%n: the node's name, so one build of
# slurmd runs twice without --enable-multiple-slurmd), and one network namespace per node on a bridge.
DIR2=/etc/slurm/llmtrain-2nodes
NET2=${SLURM_LOCAL_SUBNET:-10.78.0}        # controller .1 on the bridge, node<i> .1<i>
BRIDGE=llmtrain-br

running() {  # pid file: whether its process is alive (a killed daemon not yet reaped is not)
  local pid state
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)
  [ -n "$state" ] && [ "$state" != Z ]
}
stop_pidfile() {
  if running "$1"; then
    kill "$(cat "$1")"
    while running "$1"; do sleep 0.2; done
  fi
}
netns_of() { echo "llmtrain-$1"; }

stop_two_nodes() {
  stop_pidfile /run/slurmctld-llmtrain-2nodes.pid
  local node ns pids
  for node in node1 node2; do
    ns=$(netns_of "$node")
    [ -e "/run/netns/$ns" ] || continue
    # the node's slurmd, its job steps and their processes: everything that runs in its namespace
    pids=$(ip netns pids "$ns")
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill -9 $pids 2>/dev/null || true
      while [ -n "$(ip netns pids "$ns")" ]; do sleep 0.2; done
    fi
    ip netns del "$ns"
    rm -f "/run/slurmd-$node.pid"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
}

if [ "$ACTION" = stop ]; then
  if [ "$NODES" = 2 ]; then stop_two_nodes; else stop_pidfile /run/slurmd.pid; stop_pidfile /run/slurmctld.pid; fi
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm_local.sh: error: needs root (it installs packages and starts daemons)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge (Debian packages)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
if [ "$NODES" = 2 ] && ! command -v ip >/dev/null; then
  echo "installing iproute2 (Debian package)..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
fi

# The node's memory as slurmd sees it; CPUs: SLURM_LOCAL_CPUS (default 4 per core), more than the machine has,
# so that a 3-process parameter-server job or two sweep jobs fit on a 2-core test machine at once.
MEM=$(slurmd -C | head -n1 | grep -o 'RealMemory=[0-9]*')
CPUS=${SLURM_LOCAL_CPUS:-$(( 4 * $(nproc) ))}
mkdir -p /etc/slurm /var/log/slurm

# Settings both clusters share.
common_conf() {
  cat <<EOF
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Slurm tests pending jobs every 60 s and backfills every 30 s: a job whose dependency ended (the prepare array's
# tasks, its merge) or whose requeue hold expired would wait for that. A test cluster can afford a pass every 2 s.
SchedulerParameters=sched_interval=2,bf_interval=2
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
EOF
}

CHANGED=0
write_conf() {  # file, then its own lines on stdin; CHANGED=1 when the file changed
  local conf
  if [ ! -f "$1" ] || head -n1 "$1" | grep -qF "$MARK"; then
    conf=$({ echo "$MARK"; common_conf; cat; })
    if [ "$conf" != "$(cat "$1" 2>/dev/null)" ]; then printf '%s\n' "$conf" > "$1"; CHANGED=1; fi
  fi
}
start_controller() {  # pid file, conf: start slurmctld, or have a running one (and its nodes) re-read a new conf
  if ! running "$1"; then slurmctld -f "$2"
  elif [ "$CHANGED" = 1 ]; then SLURM_CONF=$2 scontrol reconfigure
  fi
}

# munge must answer before the daemons start (they authenticate every message with it); a munged left from an
# earlier install without its socket is replaced.
if ! munge -n >/dev/null 2>&1; then
  pkill -x munged || true
  mkdir -p /run/munge && chown munge:munge /run/munge && runuser -u munge -- munged
fi

wait_idle() {  # conf, node names...: until every node takes jobs; a node that is down (and answers) is resumed
  local conf=$1 node state
  shift
  for _ in $(seq 60); do
    local ready=0
    for node in "$@"; do
      state=$(SLURM_CONF=$conf sinfo -h -n "$node" -o %T 2>/dev/null || true)
      case "$state" in
        idle|mixed|allocated|completing) ready=$((ready + 1)) ;;
        down|drained|draining)
          echo "slurm: $node is $state: scontrol update nodename=$node state=resume" >&2
          SLURM_CONF=$conf scontrol update nodename="$node" state=resume || true ;;
      esac
    done
    if [ "$ready" = "$#" ]; then echo "slurm: node(s) $* idle" >&2; return 0; fi
    sleep 1
  done
  echo "slurm_local.sh: error: node(s) $* did not come up (last state of $node: ${state:-none}); see /var/log/slurm/" >&2
  return 1
}

if [ "$NODES" = 1 ]; then
  NODE=$(hostname -s)
  mkdir -p /var/spool/slurmctld /var/spool/slurmd
  write_conf /etc/slurm/slurm.conf <<EOF
ClusterName=llmtrain-local
SlurmctldHost=$NODE
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
NodeName=$NODE CPUs=$CPUS $MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  start_controller /run/slurmctld.pid /etc/slurm/slurm.conf
  running /run/slurmd.pid || slurmd
  wait_idle /etc/slurm/slurm.conf "$NODE"
  exit
fi

# ---- two nodes -----------------------------------------------------------------------------------------------
CONF2=$DIR2/slurm.conf
HOSTS2=$DIR2/hosts
CTLD=$(hostname -s)
mkdir -p "$DIR2" /var/spool/slurmctld-llmtrain-2nodes /var/spool/slurmd-node1 /var/spool/slurmd-node2
# SlurmctldHost in its name(address) form: a name alone resolves to each namespace's own loopback. The nodes'
# hosts file names every host a job looks up (the scripts take node1 as the rendezvous address): a name that
# falls through to DNS stalls.
write_conf "$CONF2" <<EOF
ClusterName=llmtrain-2nodes
SlurmctldHost=$CTLD($NET2.1)
SlurmctldPort=6917
StateSaveLocation=/var/spool/slurmctld-llmtrain-2nodes
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=/run/slurmctld-llmtrain-2nodes.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld-llmtrain-2nodes.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# Slurm's defaults, as on most clusters: a node that stopped answering is DOWN until an admin resumes it. It is
# declared DOWN within ~2.5 x SlurmdTimeout (default 300 s): 5 s keeps the node-failure tests short.
ReturnToService=0
SlurmdTimeout=5
NodeName=node1 NodeAddr=$NET2.11 CPUs=$CPUS $MEM State=UNKNOWN
NodeName=node2 NodeAddr=$NET2.12 CPUs=$CPUS $MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
printf '127.0.0.1 localhost\n%s.1 %s\n%s.11 node1\n%s.12 node2\n' "$NET2" "$CTLD" "$NET2" "$NET2" > "$HOSTS2"

if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET2.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
fi
for i in 1 2; do
  ns=$(netns_of "node$i")
  [ -e "/run/netns/$ns" ] && continue
  ip netns add "$ns"
  ip link add "llmtrain-v$i" type veth peer name eth0 netns "$ns"
  ip link set "llmtrain-v$i" master "$BRIDGE" up
  ip -n "$ns" addr add "$NET2.1$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done

start_controller /run/slurmctld-llmtrain-2nodes.pid "$CONF2"
for node in node1 node2; do
  running "/run/slurmd-$node.pid" && continue
  # `ip netns exec` would remount /sys and hide /sys/fs/cgroup (slurmd then exits: "Unable to initialize cgroup
  # plugin"); nsenter joins the network namespace only, unshare gives the node its hostname and its /etc/hosts.
  nsenter --net="/run/netns/$(netns_of "$node")" unshare --uts --mount \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3"' sh "$node" "$HOSTS2" "$CONF2"
done
wait_idle "$CONF2" node1 node2
echo "slurm: to use these nodes: export SLURM_CONF=$CONF2" >&2
