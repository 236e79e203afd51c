#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on this machine, for tests/test_slurm.py and CI.
#
#   tests/slurm_cluster.sh install        # Debian: slurmctld slurmd slurm-client munge, if missing
#   tests/slurm_cluster.sh start DIR      # munged + slurmctld + slurmd, everything under DIR
#   SLURM_CONF=DIR/slurm.conf sbatch ...  # the cluster's clients find it through SLURM_CONF
#   tests/slurm_cluster.sh stop DIR       # cancels jobs, stops the daemons, waits for them to go
#
# Runs as root without systemd and touches nothing outside DIR (own munge socket and key, own
# ports, a fresh StateSaveLocation), so it neither needs nor disturbs a system Slurm. DIR must be
# new or empty and reachable by the munge user (not under a 0700 directory). Every wait is bounded:
# a broken Slurm fails with the daemons' log tails, it never hangs.
set -euo pipefail

WAIT_S=${SLURM_CLUSTER_WAIT_S:-30}

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

have_all() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null &&
    command -v slurmd >/dev/null && command -v munged >/dev/null
}

install() {
  have_all && return 0
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get for it"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  have_all || die "apt-get installed Slurm but sbatch/slurmctld/slurmd/munged are not on PATH"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

logs() {
  for f in "$DIR"/munge/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd.log; do
    [ -f "$f" ] && { echo "== $f"; tail -n 15 "$f"; }
  done >&2
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s; fails with the logs.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { logs; die "timed out after ${seconds}s waiting for $what"; }
    sleep 0.2
  done
}

start() {
  [ "$(id -u)" = 0 ] || die "starting a test cluster needs root (slurmd runs jobs as their user)"
  have_all || die "Slurm is not installed: run '$0 install' (Debian, as root)"
  mkdir -p "$DIR"
  [ -z "$(ls -A "$DIR")" ] || die "$DIR is not empty: use a fresh one (a fresh StateSaveLocation)"
  chmod 0755 "$DIR"
  local host; host=$(hostname -s)

  # munge: its own key, socket, pid and seed files, all owned by the munge user; munged refuses
  # a key that others can read and runs as munge (never as root).
  mkdir -p "$DIR/munge"
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$DIR/munge"
  chmod 0755 "$DIR/munge"   # clients need to reach the socket
  chmod 0400 "$DIR/munge/munge.key"
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged \
    --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/munge/munged.log"
  wait_for "$WAIT_S" "munged's socket" test -S "$DIR/munge/munge.socket"

  mkdir -p "$DIR/state" "$DIR/spool"
  # At least 4 CPUs (config_overrides lets it claim more than there are): room for more array
  # tasks than a test's throttle lets run.
  local cpus; cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
  local mem_mb; mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=scalingtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
# No cgroups: containers and CI machines rarely delegate them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$DIR/slurm.conf
  slurmctld -f "$SLURM_CONF"
  wait_for "$WAIT_S" "slurmctld to answer" scontrol ping
  slurmd -f "$SLURM_CONF"
  wait_for "$WAIT_S" "node $host to be idle" \
    bash -c "sinfo --noheader --nodes='$host' --format=%t | grep -qx idle"
  echo "export SLURM_CONF=$SLURM_CONF"
}

# stop_daemon PIDFILE NAME: SIGTERM, a bounded wait, then SIGKILL.
stop_daemon() {
  local pidfile=$1 name=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || return 0
  local deadline=$((SECONDS + WAIT_S))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "slurm_cluster.sh: $name (pid $pid) ignored SIGTERM for ${WAIT_S}s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
}

step_sockets() { find "$DIR/spool" -maxdepth 1 -type s -name '*_*.*' 2>/dev/null; }

stop() {
  [ -f "$DIR/slurm.conf" ] || return 0
  export SLURM_CONF=$DIR/slurm.conf
  scancel --full --quiet --partition=debug 2>/dev/null || true
  # slurmstepd outlives slurmd if slurmd goes first: wait for its sockets (NODE_JOB.STEP) to go.
  local deadline=$((SECONDS + WAIT_S))
  while [ -n "$(step_sockets)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  [ -z "$(step_sockets)" ] ||
    echo "slurm_cluster.sh: job steps still running after ${WAIT_S}s: $(step_sockets)" >&2
  stop_daemon "$DIR/slurmd.pid" slurmd
  stop_daemon "$DIR/slurmctld.pid" slurmctld
  stop_daemon "$DIR/munge/munged.pid" munged
}

case "${1:-}" in
  install) install ;;
  start) DIR=${2:?usage: $0 start DIR}; start ;;
  stop) DIR=${2:?usage: $0 stop DIR}; stop ;;
  *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
