#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the scheduler tests (tests/test_slurm.py)
# and for trying `--launch=slurm` by hand: bash scripts/slurm_local.sh start|stop|status.
#
# `start` installs Debian's slurm-wlm and munge if they are missing (root), writes a slurm.conf
# for this machine, starts munged, slurmctld and slurmd and waits until the node is idle;
# `stop` stops them and removes the state; `status` says whether it is up. Everything it writes
# (config, munge key and socket, state, spool, logs, pid files) lives in $RESNET_JAX_SLURM_DIR
# (default /tmp/resnet_jax_slurm): /etc/slurm, /etc/munge and the system's services are left
# alone. Clients find the cluster through SLURM_CONF, which `start` prints:
#   export SLURM_CONF=/tmp/resnet_jax_slurm/slurm.conf
# The tests look there by themselves. Idempotent: `start` on a running cluster only checks it.
set -euo pipefail
dir=${RESNET_JAX_SLURM_DIR:-/tmp/resnet_jax_slurm}
export SLURM_CONF=$dir/slurm.conf
node=$(hostname -s)

up() { [ -f "$SLURM_CONF" ] && scontrol ping 2>/dev/null | grep -q UP &&
       sinfo -h -n "$node" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

stop_daemon() {  # Stops the daemon whose pid file is $1, waiting for it to go.
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "slurm_local: slurm-wlm and munge are not installed;" \
                               "installing them needs root" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

write_config() {
  # slurmd refuses a node that claims more CPUs than it has unless told (config_overrides);
  # claiming four per core lets a sweep's tasks and a multi-task point run at once on a small
  # machine, as they would on a real cluster's many nodes. They share the cores: no cgroups.
  # cred_expire is also how long SLURM holds a requeued job before it may start again: the
  # default two minutes would dominate the requeue tests, and SLURM refuses less than 5. A job
  # whose hold has passed waits for the main scheduling loop, every 60 s by default
  # (sched_interval): every second here, where the tests wait on it (a requeue test took 57 s
  # with cred_expire 10 and sched_interval 60, 30 s with 5 and 5, 23 s with 5 and 1).
  local cpus=$(( $(nproc) * 4 ))
  local memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
  cat > "$SLURM_CONF" <<EOF
ClusterName=resnet_jax_local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=5
SlurmctldPort=${RESNET_JAX_SLURMCTLD_PORT:-6917}
SlurmdPort=${RESNET_JAX_SLURMD_PORT:-6918}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=60
SchedulerParameters=sched_interval=1
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
# Jobs in "urgent" preempt jobs in "debug", which SLURM then requeues, as a cluster does; with no
# GraceTime, SIGTERM then SIGKILL after KillWait, time enough for a tiny run to checkpoint.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$node MaxTime=INFINITE State=UP PriorityTier=10
EOF
}

start() {
  if up; then echo "slurm_local: up ($SLURM_CONF)"; return 0; fi
  install_packages
  stop_all  # Whatever a previous start left half-running.
  mkdir -p "$dir/state" "$dir/spool"
  chmod 700 "$dir"
  write_config
  [ -f "$dir/munge.key" ] || mungekey --create --keyfile="$dir/munge.key" 2>/dev/null ||
    dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge.key"
  munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 120); do
    if up; then echo "slurm_local: up; clients need: export SLURM_CONF=$SLURM_CONF"; return 0; fi
    # A node that registered DOWN (a previous run's state) is brought back.
    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  echo "slurm_local: the node did not become idle; logs in $dir" >&2
  tail -n 5 "$dir"/*.log >&2 || true
  exit 1
}

stop_all() {
  if [ -f "$SLURM_CONF" ] && scontrol ping >/dev/null 2>&1; then
    scancel --full --quiet --state=RUNNING >/dev/null 2>&1 || true
  fi
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  stop_daemon "$dir/munged.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop_all; rm -rf "$dir"; echo "slurm_local: stopped" ;;
  status)
    if up; then sinfo; else echo "slurm_local: not running" >&2; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
