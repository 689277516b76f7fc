#!/usr/bin/env bash
# Stop the one-node Slurm cluster of start-local-slurm.sh: cancel every job, shut down
# slurmctld and slurmd, stop munged if start-local-slurm.sh started it.
#
#   sudo bash scripts/slurm/stop-local-slurm.sh           # keep $PIPELINE_SLURM_DIR (logs)
#   sudo bash scripts/slurm/stop-local-slurm.sh --purge   # and delete it
#
# Only the processes named in this cluster's pid files are signalled. Idempotent: with
# nothing running it exits 0. Exit status 1 (with an `ERROR:` line) if a daemon will not stop.
#
# Settings: PIPELINE_SLURM_DIR (default /tmp/pipeline-slurm), PIPELINE_SLURM_TIMEOUT
# (seconds to wait for each daemon before signalling it, default 30).
set -euo pipefail

dir=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
timeout=${PIPELINE_SLURM_TIMEOUT:-30}
conf=$dir/etc/slurm.conf
purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *)
        echo "usage: $0 [--purge]" >&2
        exit 2
        ;;
esac

say() { echo "stop-local-slurm: $*"; }
fail() {
    echo "stop-local-slurm: ERROR: $*" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || fail "run this as root"
[[ $dir == /?* && $dir != *..* ]] || fail "PIPELINE_SLURM_DIR must be an absolute path other than / (got '$dir')"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || fail "PIPELINE_SLURM_TIMEOUT must be a positive integer (got '$timeout')"

# pid_of PIDFILE COMM: the pid in PIDFILE if it is a live process whose command is COMM.
pid_of() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

# await_exit PID NAME: wait for PID to end; SIGTERM after $timeout s, SIGKILL 5 s later.
await_exit() {
    local pid=$1 name=$2 i
    for ((i = 0; i < timeout * 5; i++)); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.2
    done
    say "$name (pid $pid) still up after ${timeout}s: SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 25; i++)); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.2
    done
    say "$name (pid $pid) ignored SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
    [ ! -d "/proc/$pid" ] || fail "$name (pid $pid) will not stop"
}

# Read the pids first: the daemons delete their pid files as they exit.
ctld=$(pid_of "$dir/run/slurmctld.pid" slurmctld || true)
slurmd=$(pid_of "$dir/run/slurmd.pid" slurmd || true)

if [ -n "$ctld" ] && [ -s "$conf" ]; then
    export SLURM_CONF=$conf
    # Jobs first: their job steps (slurmstepd) would otherwise outlive the daemons.
    jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel $jobs || true
        for ((i = 0; i < timeout * 5; i++)); do
            [ -n "$(squeue -h -o '%A' 2>/dev/null)" ] || break
            sleep 0.2
        done
        [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] || say "WARNING: still listed after ${timeout}s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
    fi
    # Saves the controller's state and stops slurmctld and every slurmd.
    scontrol shutdown || say "WARNING: 'scontrol shutdown' failed, stopping the daemons by signal"
fi
if [ -n "$ctld" ]; then
    await_exit "$ctld" slurmctld
    say "slurmctld (pid $ctld) stopped"
fi
if [ -n "$slurmd" ]; then
    # Without a controller nobody else tells slurmd to stop.
    [ -n "$ctld" ] || kill -TERM "$slurmd" 2>/dev/null || true
    await_exit "$slurmd" slurmd
    say "slurmd (pid $slurmd) stopped"
fi
[ -n "$ctld$slurmd" ] || say "slurmctld and slurmd were not running"

munged=$(pid_of /run/munge/munged.pid munged || true)
if [ -n "$munged" ] && [ "$(cat "$dir/run/munged.ours" 2>/dev/null)" = "$munged" ]; then
    kill -TERM "$munged"
    await_exit "$munged" munged
    rm -f "$dir/run/munged.ours"
    say "munged (pid $munged) stopped"
elif [ -n "$munged" ]; then
    say "munged (pid $munged) was not started by start-local-slurm.sh: left running"
fi

if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$conf" ]; then
    rm -f /etc/slurm/slurm.conf
fi
if [ "$purge" = 1 ] && [ -d "$dir" ]; then
    rm -rf "$dir"
    say "removed $dir"
fi
say "done"
