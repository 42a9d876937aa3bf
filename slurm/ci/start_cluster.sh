#!/usr/bin/env bash
# Start a real single-node SLURM cluster on loopback, for CI (tests/integration/test_slurm.py).
#
# Idempotent and fast: installs slurm-wlm + munge when missing (Debian/Ubuntu, needs root),
# writes /etc/slurm/slurm.conf for this machine (NodeName = hostname, NodeAddr=127.0.0.1,
# CPUs = nproc, no GPUs, no accounting), starts munged (as the munge user), slurmctld and
# slurmd (as root), and waits until the node is idle. Does nothing when the cluster is up.
# Exit 0 = cluster up; anything else = it could not be started (the reason is printed).
set -euo pipefail

log() { echo "start_cluster: $*" >&2; }

cluster_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -1) || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* || "$state" == completing* ]]
}

if [[ $(id -u) -ne 0 ]]; then
    log "needs root to install/start slurm (running as $(id -un))"
    exit 1
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
# Memory the node advertises: 90% of physical, in MB.
MEM=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
CONF_DIR=/etc/slurm
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge

NEW_CONF=$(cat <<CONF
# Written by slurm/ci/start_cluster.sh: one node on loopback for CI.
ClusterName=tulipci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire seconds (default 120): CI wants it at once.
AuthInfo=cred_expire=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
SchedulerParameters=sched_interval=1
KillWait=10
GresTypes=gpu
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=ci Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
if [[ -f "$CONF_DIR/slurm.conf" && "$(cat "$CONF_DIR/slurm.conf")" == "$NEW_CONF" ]] && cluster_up; then
    log "cluster already up"
    exit 0
fi
CHANGED=0
if [[ ! -f "$CONF_DIR/slurm.conf" || "$(cat "$CONF_DIR/slurm.conf")" != "$NEW_CONF" ]]; then
    printf '%s\n' "$NEW_CONF" > "$CONF_DIR/slurm.conf"
    CHANGED=1
fi
rm -f "$CONF_DIR/cgroup.conf"  # an empty one only makes slurmd complain

# munge: a key owned by the munge user, daemon run as that user.
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! pgrep -u munge -x munged >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- munged --force
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done

# slurmctld + slurmd (the pid files say whether ours still run; a stale one is ignored).
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [[ $CHANGED == 1 ]]; then  # a changed slurm.conf: restart the daemons that run with the old one
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pidfile"; then
            pid=$(cat "$pidfile"); kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if ! running /run/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld
fi
if ! running /run/slurmd.pid; then
    log "starting slurmd"
    slurmd
fi

for _ in $(seq 100); do
    if cluster_up; then
        log "cluster up: node $HOST, $CPUS CPUs, partition ci"
        exit 0
    fi
    # A node left DOWN/DRAIN by an earlier run comes back with this.
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    sleep 0.2
done
log "cluster did not come up; sinfo says: $(sinfo -N 2>&1 | tail -n +2)"
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
