#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the sweep tests and for trying the slurm launcher:
#   bash experiments/slurm_local.sh install   # Debian's slurm-wlm and munge (apt, as root), if missing
#   bash experiments/slurm_local.sh start     # install if missing, write the config, start what is not running
#   bash experiments/slurm_local.sh status    # what runs; exits 0 when the node takes jobs, 3 otherwise
#   bash experiments/slurm_local.sh stop      # cancel its jobs, stop the daemons it started
# `start` prints what a client needs, as `export` lines (eval "$(bash experiments/slurm_local.sh start)"):
# SLURM_CONF, which points sbatch, squeue, scontrol and submitit at this cluster. A second `start` on a
# running cluster changes nothing and prints the same lines.
#
# Everything lives in GIST_SLURM_DIR (default ${TMPDIR:-/tmp}/gist-lightning-slurm): slurm.conf, state
# and spool folders, pid files, logs (log/slurmctld.log, log/slurmd.log, log/munged.log) and a munged
# of its own with a fresh key on its own socket. Ports are GIST_SLURM_PORT (slurmctld, default 16817) and
# the next one (slurmd), so a SLURM already installed on the machine, its /etc/slurm/slurm.conf, its
# munged (/run/munge) and its daemons on 6817/6818 are left alone; its packages are reused.
#
# The cluster: one node named after `hostname -s` on 127.0.0.1 with the machine's CPUs and 90% of its
# memory, one partition GIST_SLURM_PARTITION (default `local`, the default partition). Cores are the
# consumable resource, memory is not (CR_CPU): an array with no --mem runs one task per CPU at once.
# Jobs run as the submitting user with the submitter's environment (sbatch's default --export=ALL).
# Set for tests: jobs start within a second of their submission, a requeued job may start again 5 s
# later (cred_expire; SLURM's default holds it 120 s), KillWait 2 s, finished jobs stay visible to
# squeue/scontrol for MinJobAge=10 s. No accounting (no slurmdbd): `sacct` answers nothing here.
# Signals: `scancel --signal=USR2 JOB` reaches every process of the job's steps (as `--signal=USR2@90`
# before a time limit does), `scancel --signal=USR2 --batch JOB` only the batch shell.
# Needs root (apt, and slurmd must run as root to start jobs).
set -euo pipefail

DIR=${GIST_SLURM_DIR:-${TMPDIR:-/tmp}/gist-lightning-slurm}
CTLD_PORT=${GIST_SLURM_PORT:-16817}
SLURMD_PORT=$((CTLD_PORT + 1))
PARTITION=${GIST_SLURM_PARTITION:-local}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
WAIT_S=${GIST_SLURM_WAIT_S:-60}

say() { echo "slurm_local: $*" >&2; }
die() { say "$*"; exit 1; }

# a process that runs (/proc, not kill -0: a user sees root's daemons; a zombie has ended)
alive() { [ -d "/proc/$1" ] && ! grep -q '^State:.*zombie' "/proc/$1/status" 2>/dev/null; }
# the pid in a pid file, where that process still runs
running() { local pid; pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) && alive "$pid" && echo "$pid"; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it"
    say "installing slurm-wlm and munge (apt)"
    # Debian's postinst scripts do not start slurmctld/slurmd without /etc/slurm/slurm.conf (none is written)
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >&2 \
        || die "apt-get install slurm-wlm munge failed"
}

write_config() {
    local node hardware cpus mem_mb
    node=$(hostname -s)
    # the machine as slurmd sees it (not nproc, which follows OMP_NUM_THREADS)
    hardware=$(slurmd -C | head -1)
    cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$hardware")
    mem_mb=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$hardware")
    mem_mb=$((mem_mb * 9 / 10))
    : > "$DIR/plugstack.conf"  # not the system's /etc/slurm/plugstack.conf
    cat > "$CONF" <<EOF
# written by experiments/slurm_local.sh start: a one-node test cluster (see that script)
ClusterName=gistlocal
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our munged; a requeued job waits cred_expire seconds before it may start again
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# a submission schedules at once; a requeued job becomes eligible on a clock (cred_expire above), which
# only the periodic pass sees (every 60 s by default). No SchedulerTimeSlice: it only acts in gang
# scheduling (PreemptMode=GANG), which this cluster does not use.
SchedulerParameters=batch_sched_delay=0,sched_interval=1
JobRequeue=1
KillWait=2
MinJobAge=10
ReturnToService=2
InactiveLimit=0
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    [ -n "$(running munged)" ] && return 0
    rm -f "$DIR/munge/munge.key" "$SOCKET" "$SOCKET.lock"
    mungekey --create --keyfile="$DIR/munge/munge.key" >&2
    chmod 600 "$DIR/munge/munge.key"
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" 9>&- \
        || die "munged did not start (log: $DIR/log/munged.log)"
}

node_ready() {
    # the controller answers and the node takes jobs (idle, mixed or allocated)
    SLURM_CONF=$CONF sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}

start() {
    install
    mkdir -p "$DIR"
    # two starts at once (two test sessions) start one cluster; the daemons must not inherit the lock
    exec 9>"$DIR/.lock"
    flock 9
    if [ -n "$(running munged)" ] && [ -n "$(running slurmctld)" ] && [ -n "$(running slurmd)" ] && node_ready; then
        say "already running ($CONF)"
    else
        [ "$(id -u)" = 0 ] || die "starting slurmd needs root"
        mkdir -p "$DIR"/{state,spool,run,log,munge}
        chmod 755 "$DIR/munge"  # clients of any user reach the socket; the key is 600
        start_munged
        if [ -z "$(running slurmctld)" ] && [ -z "$(running slurmd)" ]; then
            write_config  # rewritten only while nothing reads it
        fi
        [ -n "$(running slurmctld)" ] || slurmctld -f "$CONF" 9>&- \
            || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
        [ -n "$(running slurmd)" ] || slurmd -f "$CONF" -N "$(hostname -s)" 9>&- \
            || die "slurmd did not start (log: $DIR/log/slurmd.log)"
        local waited=0 name
        until node_ready; do
            [ "$waited" -lt "$((WAIT_S * 5))" ] || die "the node did not come up within ${WAIT_S}s" \
                "(logs: $DIR/log/slurmctld.log, $DIR/log/slurmd.log)"
            for name in slurmctld slurmd; do  # one that ended (a port taken, a bad config) says why in its log
                [ "$waited" -lt 15 ] || [ -n "$(running $name)" ] || die "$name stopped:" \
                    "$(grep -hE 'fatal|error' "$DIR/log/$name.log" | tail -1) (log: $DIR/log/$name.log)"
            done
            sleep 0.2
            waited=$((waited + 1))
        done
        say "started ($CONF)"
    fi
    echo "export SLURM_CONF=$CONF"
    echo "export GIST_SLURM_PARTITION=$PARTITION"
}

stop() {
    [ -d "$DIR/run" ] || { say "not running"; return 0; }
    exec 9>"$DIR/.lock"
    flock 9
    if [ -n "$(running slurmctld)" ]; then
        SLURM_CONF=$CONF scancel --quiet --full --partition="$PARTITION" 2>/dev/null || true
    fi
    local name pid pids=()
    for name in slurmd slurmctld munged; do
        pid=$(running "$name") || continue
        kill "$pid" && pids+=("$pid") && say "stopping $name ($pid)"
    done
    for pid in "${pids[@]}"; do  # each takes 1-2 s to save its state and exit
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        ! alive "$pid" || kill -9 "$pid"
    done
    rm -f "$DIR"/run/*.pid
}

status() {
    local name pid up=0
    for name in munged slurmctld slurmd; do
        if pid=$(running "$name"); then echo "$name: running ($pid)"; else echo "$name: stopped"; up=3; fi
    done
    [ "$up" = 0 ] || return $up  # (a client waits MessageTimeout, 10 s, for a controller that is not there)
    echo "SLURM_CONF=$CONF"
    SLURM_CONF=$CONF sinfo 2>&1 || true
    SLURM_CONF=$CONF squeue 2>&1 || true
    node_ready || return 3
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 install|start|stop|status" ;;
esac
