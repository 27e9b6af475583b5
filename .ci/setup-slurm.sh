#!/usr/bin/env bash
# Install and start a single-node SLURM (plus the Torque-compatible qsub/qstat/qdel) on
# this machine, so the integration tests run against a real batch system.
#
# Idempotent: rerunning it when SLURM is already up changes nothing and only waits for
# the node to be usable. If the generated slurm.conf differs from the one in place, the
# daemons this script manages are restarted with the new one.
#
# Debian 12 (slurm 22.05). Needs root, or sudo. Exits non-zero with a message saying
# what failed (and where the logs are) if the node is not idle by the deadline.
#
# Environment:
#   SLURM_SETUP_TIMEOUT  seconds to wait for the node to become idle (default 90)
#   SLURM_MIN_JOB_AGE    seconds finished jobs stay visible to scontrol (default 600)
set -euo pipefail

TIMEOUT="${SLURM_SETUP_TIMEOUT:-90}"
MIN_JOB_AGE="${SLURM_MIN_JOB_AGE:-600}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm

say() { printf 'setup-slurm: %s\n' "$*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E -- "$0" "$@"
    fi
    die "must run as root (or with sudo available) to install and start SLURM"
fi

# --- install ---------------------------------------------------------------------------
need_install=0
for cmd in sbatch squeue scancel scontrol sinfo slurmctld slurmd munged qsub qstat qdel; do
    command -v "$cmd" >/dev/null 2>&1 || need_install=1
done
if [[ $need_install -eq 1 ]]; then
    say "installing slurm-wlm munge slurm-wlm-torque"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge slurm-wlm-torque >/dev/null ||
        die "apt-get install slurm-wlm munge slurm-wlm-torque failed"
fi

# --- munge -----------------------------------------------------------------------------
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

if ! munge_works; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mungekey -c -f -k /etc/munge/munge.key 2>/dev/null ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    if ! pgrep -x munged >/dev/null; then
        say "starting munged"
        su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    deadline=$((SECONDS + 15))
    until munge_works; do
        ((SECONDS < deadline)) || die "munge -n | unmunge does not succeed (see /var/log/munge/munged.log)"
        sleep 0.5
    done
fi

# --- slurm.conf ------------------------------------------------------------------------
node_line=$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1) ||
    die "'slurmd -C' printed no NodeName line"
[[ -n $node_line ]] || die "'slurmd -C' printed no NodeName line"
node=${node_line#NodeName=}
node=${node%% *}

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd

new_conf=$(
    cat <<EOF
# Written by .ci/setup-slurm.sh: a single-node SLURM for hpc-toolkit's integration tests.
ClusterName=hpc-ci
SlurmctldHost=$node
AuthType=auth/munge
# A requeued job waits out its step credential's lifetime before it starts again
# (120 s by default): 20 s keeps the requeue tests short.
AuthInfo=cred_expire=20
SlurmUser=root
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay visible to 'scontrol show job' this long (no sacct here).
MinJobAge=$MIN_JOB_AGE
# Kill a job quickly once it exceeds its walltime, so TIMEOUT tests stay short.
KillWait=5
OverTimeLimit=0
InactiveLimit=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# Jobs of the 'urgent' partition preempt (cancel) those of 'debug': how the tests
# get a real PREEMPTED job.
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
$node_line
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8 PriorityTier=1
PartitionName=urgent Nodes=$node MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2
EOF
)

conf_changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    say "writing $CONF"
    printf '%s\n' "$new_conf" >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    conf_changed=1
fi

# --- daemons ---------------------------------------------------------------------------
# The pid of a daemon we started, from its pid file, if that process is still alive.
daemon_pid() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

stop_daemon() {
    local name=$1 pidfile=$2 pid deadline
    pid=$(daemon_pid "$pidfile") || return 0
    say "stopping $name (pid $pid) to apply the new $CONF"
    kill "$pid"
    deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || die "$name (pid $pid) did not stop"
        sleep 0.2
    done
}

if [[ $conf_changed -eq 1 ]]; then
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
fi

if ! daemon_pid /run/slurmctld.pid >/dev/null && ! pgrep -x slurmctld >/dev/null; then
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
fi

deadline=$((SECONDS + TIMEOUT))
until scontrol ping 2>/dev/null | grep -q 'is UP'; do
    ((SECONDS < deadline)) || die "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s (see $LOG_DIR/slurmctld.log)"
    sleep 0.5
done

if ! daemon_pid /run/slurmd.pid >/dev/null && ! pgrep -x slurmd >/dev/null; then
    say "starting slurmd"
    slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
fi

# --- wait for the node -----------------------------------------------------------------
state=""
while :; do
    state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null | head -n1 || true)
    case "$state" in
    idle | mixed | allocated | completing)
        # mixed/allocated: jobs from an earlier run are still on the node; it works.
        break
        ;;
    down* | drain* | drained* | fail*)
        say "node $node is '$state': resuming it"
        scontrol update nodename="$node" state=resume 2>/dev/null || true
        ;;
    esac
    ((SECONDS < deadline)) || die "node $node is '${state:-not listed}' in sinfo after ${TIMEOUT}s, not idle (see $LOG_DIR/slurmd.log and $LOG_DIR/slurmctld.log)"
    sleep 0.5
done

say "SLURM is up: node $node is $state; partitions debug and urgent (preempts debug)"
sinfo >&2
