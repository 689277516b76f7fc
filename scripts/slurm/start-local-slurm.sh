#!/usr/bin/env bash
# Start a real one-node Slurm cluster (munged + slurmctld + slurmd, Debian's packages) on
# this machine, for `pipeline run --executor slurm` development and its integration tests.
#
#   sudo bash scripts/slurm/start-local-slurm.sh   # then: source "$PIPELINE_SLURM_DIR/env.sh"
#   sudo bash scripts/slurm/stop-local-slurm.sh [--purge]
#
# Runs as root, reads no stdin, works on a fresh Debian 12 machine (apt-get installs what is
# missing) and on one without systemd: the daemons are started by hand and fork themselves.
# Idempotent: when the cluster is already up it only checks it and exits 0. A fresh start
# writes the configuration from `slurmd -C` and wipes the previous Slurm state. Every failure
# is one `ERROR:` line on stderr (with the daemons' log tails when one of them failed) and
# exit status 1.
#
# Settings (environment):
#   PIPELINE_SLURM_DIR      config, state, logs and pid files (default /tmp/pipeline-slurm)
#   PIPELINE_SLURM_CPUS     CPUs the node advertises (default: the real count). More than the
#                           real count lets more small jobs run at once (oversubscribed).
#   PIPELINE_SLURM_TIMEOUT  seconds to wait for each daemon and for the node (default 60)
#   PIPELINE_SLURM_ETC      1: link /etc/slurm/slurm.conf to the generated file so Slurm's
#                           commands work without SLURM_CONF (default 1)
set -euo pipefail

dir=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
timeout=${PIPELINE_SLURM_TIMEOUT:-60}
link_etc=${PIPELINE_SLURM_ETC:-1}
conf=$dir/etc/slurm.conf
ctld_pid=$dir/run/slurmctld.pid
slurmd_pid=$dir/run/slurmd.pid
munge_pid=/run/munge/munged.pid
packages=(slurmctld slurmd slurm-client munge)
here=$(cd "$(dirname "$0")" && pwd)
t0=$SECONDS

say() { echo "start-local-slurm [$((SECONDS - t0))s]: $*"; }
fail() {
    echo "start-local-slurm: ERROR: $*" >&2
    exit 1
}
# A daemon misbehaved: the end of each log says why more often than our message does.
fail_with_logs() {
    echo "start-local-slurm: ERROR: $*" >&2
    local f
    for f in "$dir/log/slurmctld.log" "$dir/log/slurmd.log" /var/log/munge/munged.log; do
        if [ -s "$f" ]; then
            echo "--- tail of $f" >&2
            tail -n 15 "$f" >&2
        fi
    done
    echo "start-local-slurm: clean up with: PIPELINE_SLURM_DIR=$dir bash $here/stop-local-slurm.sh" >&2
    exit 1
}

# running PIDFILE COMM: the pid file names a live process whose command is COMM.
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# await WHAT CHECK...: retry CHECK every 0.2 s for up to $timeout seconds.
await() {
    local what=$1 until=$((SECONDS + timeout))
    shift
    while ! "$@"; do
        [ "$SECONDS" -lt "$until" ] || fail_with_logs "gave up after ${timeout}s waiting for $what"
        sleep 0.2
    done
}

# no_fatal NAME CHECK...: stop waiting at once if daemon NAME logged a fatal error.
no_fatal() {
    local name=$1
    shift
    if grep -q ' fatal: ' "$dir/log/$name.log" 2>/dev/null; then
        fail_with_logs "$name stopped with a fatal error"
    fi
    "$@"
}

[ "$(id -u)" = 0 ] || fail "run this as root: munged and slurmd need it"
[[ $dir == /?* && $dir != *..* ]] || fail "PIPELINE_SLURM_DIR must be an absolute path other than / (got '$dir')"
[[ -z ${PIPELINE_SLURM_CPUS:-} || $PIPELINE_SLURM_CPUS =~ ^[1-9][0-9]*$ ]] \
    || fail "PIPELINE_SLURM_CPUS must be a positive integer (got '$PIPELINE_SLURM_CPUS')"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || fail "PIPELINE_SLURM_TIMEOUT must be a positive integer (got '$timeout')"

# --- 1. packages ---------------------------------------------------------------------------
install_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install them (this script needs Debian or Ubuntu)"
    # The packages' postinst would start the daemons through invoke-rc.d, which fails
    # without systemd; a policy-rc.d answering 101 tells it not to. We start them below.
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# temporary, from pipeline start-local-slurm.sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    say "installing ${missing[*]}"
    local ok=1
    export DEBIAN_FRONTEND=noninteractive
    # Another apt may hold the dpkg lock on a shared machine: wait for it rather than fail.
    apt-get -o DPkg::Lock::Timeout=300 update -qq || ok=0
    if [ "$ok" = 1 ]; then
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" || ok=0
    fi
    [ "$own_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
    [ "$ok" = 1 ] || fail "apt-get could not install ${missing[*]} (see the apt output above)"
}
install_packages
say "packages: $(dpkg-query -W -f='${Package}=${Version} ' "${packages[@]}")"
id slurm >/dev/null 2>&1 || fail "the 'slurm' user does not exist (the slurm packages create it; reinstall slurm-wlm-basic-plugins)"
id munge >/dev/null 2>&1 || fail "the 'munge' user does not exist (the munge package creates it; reinstall munge)"

# --- 2. munged -----------------------------------------------------------------------------
# The package's key and socket are the defaults every Slurm command looks for.
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key || fail "mungekey could not create /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -m 0755 "$dir" "$dir/run"
if running "$munge_pid" munged; then
    say "munged already running (pid $(cat "$munge_pid"))"
else
    runuser -u munge -- /usr/sbin/munged || fail_with_logs "munged did not start"
    await "munged to write its pid file" running "$munge_pid" munged
    # Remembered so that the stop script stops this munged and no other.
    cat "$munge_pid" >"$dir/run/munged.ours"
    say "munged started (pid $(cat "$munge_pid"))"
fi
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
await "munge to encode and decode a credential" munge_works

# --- 3. configuration (fresh start only) ---------------------------------------------------
write_config() {
    local hw node mem node_line extra=""
    hw=$(slurmd -C | head -n 1)
    [[ $hw =~ ^NodeName=([^ ]+).*RealMemory=([0-9]+) ]] || fail "cannot read the node from 'slurmd -C': $hw"
    node=${BASH_REMATCH[1]}
    mem=${BASH_REMATCH[2]}
    [ "$node" = "$(hostname -s)" ] || fail "'slurmd -C' names the node '$node' but 'hostname -s' is '$(hostname -s)'"
    node_line=$hw
    if [ -n "${PIPELINE_SLURM_CPUS:-}" ]; then
        node_line="NodeName=$node CPUs=$PIPELINE_SLURM_CPUS RealMemory=$mem"
        extra="SlurmdParameters=config_overrides"
    fi
    cat >"$conf" <<CONF
# Written by pipeline's scripts/slurm/start-local-slurm.sh at $(date -u +%FT%TZ).
# One node, munge authentication, no cgroups, no accounting database.
ClusterName=pipelineci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
StateSaveLocation=$dir/state/slurmctld
SlurmdSpoolDir=$dir/state/slurmd
SlurmctldPidFile=$ctld_pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Processes tracked through /proc; --mem enforced by sampling RSS every second.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
SchedulerType=sched/backfill
# batch_sched_delay=0: a job starts on the next ~1 s scheduler tick instead of up to 3 s later.
# sched_interval=5: jobs whose dependency can never be met are noticed in seconds, not a minute.
SchedulerParameters=batch_sched_delay=0,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job with no --mem takes the whole node's memory and jobs run one at a time.
DefMemPerCPU=1024
# Impossible requests are rejected by sbatch instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol this long (the executor reads their exit).
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
$extra
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    chmod 0644 "$conf"
    say "wrote $conf ($node_line)"
}

if running "$ctld_pid" slurmctld; then
    [ -s "$conf" ] || fail "slurmctld runs (pid $(cat "$ctld_pid")) but $conf is missing; run stop-local-slurm.sh first"
    say "slurmctld already running (pid $(cat "$ctld_pid"))"
else
    if running "$slurmd_pid" slurmd; then
        fail "slurmd (pid $(cat "$slurmd_pid")) runs without slurmctld; run stop-local-slurm.sh first"
    fi
    rm -rf "$dir/state" "$dir/log/jobcomp.txt" "$ctld_pid" "$slurmd_pid"
    install -d -m 0755 "$dir/etc" "$dir/state" "$dir/state/slurmd"
    install -d -o slurm -g slurm -m 0755 "$dir/state/slurmctld" "$dir/log" "$dir/run"
    runuser -u slurm -- test -w "$dir/state/slurmctld" \
        || fail "the slurm user cannot write $dir/state/slurmctld (is a parent directory private?)"
    # The last run's 'fatal:' lines must not be mistaken for this run's.
    for name in slurmctld slurmd; do
        if [ -e "$dir/log/$name.log" ]; then mv -f "$dir/log/$name.log" "$dir/log/$name.log.prev"; fi
    done
    write_config
fi
export SLURM_CONF=$conf
if [ "$link_etc" = 1 ]; then
    if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
        say "WARNING: /etc/slurm/slurm.conf is a real file, left alone: set SLURM_CONF=$conf"
    else
        install -d -m 0755 /etc/slurm
        ln -sfn "$conf" /etc/slurm/slurm.conf
    fi
fi

# --- 4. daemons ----------------------------------------------------------------------------
ctld_answers() { timeout 3 scontrol ping 2>/dev/null | grep -q UP; }
if ! running "$ctld_pid" slurmctld; then
    slurmctld -f "$conf" || fail_with_logs "slurmctld did not start"
    await "slurmctld to answer 'scontrol ping'" no_fatal slurmctld ctld_answers
    say "slurmctld started (pid $(cat "$ctld_pid"))"
fi
if ! running "$slurmd_pid" slurmd; then
    slurmd -f "$conf" || fail_with_logs "slurmd did not start"
    await "slurmd to write its pid file" no_fatal slurmd running "$slurmd_pid" slurmd
    say "slurmd started (pid $(cat "$slurmd_pid"))"
fi
node_up() { sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)$'; }
await "the node to be usable in sinfo (see 'scontrol show node')" no_fatal slurmd node_up
say "node: $(sinfo -h -N -o '%N %t cpus=%c memory=%mMB')"

# --- 5. one job end to end -----------------------------------------------------------------
# Polled rather than 'sbatch --wait', which first looks after 2 s and then after 8 s.
state_of() { scontrol show job -o "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
ended() { case $(state_of "$1") in PENDING | RUNNING | CONFIGURING | COMPLETING | "") return 1 ;; esac; }
out=$dir/run/smoke.out
rm -f "$out"
job=$(sbatch --parsable -J pipeline-smoke -o "$out" --wrap 'echo smoke-ok') \
    || fail_with_logs "sbatch could not submit the smoke-test job"
job=${job%%;*}
await "smoke-test job $job to end" ended "$job"
[ "$(state_of "$job")" = COMPLETED ] || fail_with_logs "smoke-test job $job ended $(state_of "$job")"
grep -q smoke-ok "$out" || fail_with_logs "smoke-test job $job completed but wrote no output to $out"
rm -f "$out"
say "smoke-test job $job completed"

printf 'export SLURM_CONF=%s\nexport PIPELINE_SLURM_DIR=%s\n' "$conf" "$dir" >"$dir/env.sh"
say "cluster up: source $dir/env.sh; stop: PIPELINE_SLURM_DIR=$dir bash $here/stop-local-slurm.sh [--purge]"
