# shellcheck shell=bash disable=SC2034
# (SC2034: the variables below are used by the scripts that source this file.)
# Helpers shared by schedulers/slurm/up and schedulers/slurm/down. Sourced, never executed.
#
# Why not `pgrep`/`kill -0` alone: PID 1 on the CI/dev machines is a sandbox init that reaps
# orphans only every ~2 s, so a daemon that has exited lingers as a zombie (state Z) and
# `kill -0` keeps succeeding. Every liveness check here reads /proc/PID/stat and treats Z
# (and X) as gone.

SLURM_CI_ROOT=${SLURM_CI_ROOT:-/tmp/slurm-ci}
SLURM_CI_USER=${SLURM_CI_USER:-slurmtest}

# Fixed paths. The config sits at Slurm's default path so that every client (sbatch, squeue,
# the Torque wrappers, slurmrestd, pyslurm) finds it without SLURM_CONF.
SLURM_CI_CONF=/etc/slurm/slurm.conf
MUNGE_PIDFILE=/run/munge/munged.pid
MUNGE_SOCKET=/run/munge/munge.socket.2
CTLD_PIDFILE=$SLURM_CI_ROOT/run/slurmctld.pid
SLURMD_PIDFILE=$SLURM_CI_ROOT/run/slurmd.pid
# slurmrestd does not daemonize; `up` starts it in the background and writes this file itself.
RESTD_PIDFILE=$SLURM_CI_ROOT/run/slurmrestd.pid
# Facts for env.sh (node name, CPUs, restd URL); written by `up`, removed by `down`.
FACTS_FILE=$SLURM_CI_ROOT/run/ci.env
# Copy of the slurm.conf the running slurmctld was started with: a difference means the
# daemons must be restarted (a plain `scontrol reconfigure` does not apply JobCompType or
# AuthAltTypes, see the reference's pitfall 6).
STARTED_CONF=$SLURM_CI_ROOT/run/slurm.conf.started

SLURMCTLD_PORT=6817

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# now_us: wall clock in microseconds, without forking (bash 5 EPOCHREALTIME; strip the
# locale's decimal separator).
now_us() { local t=${EPOCHREALTIME//[!0-9]/}; printf '%s' "$t"; }

# secs_since START_US: "1.23" seconds elapsed since START_US.
secs_since() {
    local now d
    now=$(now_us)
    d=$(( (now - $1) / 10000 ))
    printf '%d.%02d' $((d / 100)) $((d % 100))
}

# pid_live PID NAME: true if PID exists, is not a zombie, and its comm is NAME.
pid_live() {
    local pid=$1 name=$2 stat rest state comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
    comm=${stat#*(}; comm=${comm%)*}
    rest=${stat##*) }; state=${rest%% *}
    [[ $comm == "$name" && $state != [ZX] ]]
}

# live_pids NAME [PIDFILE] [all]: print live (non-zombie) pids of daemon NAME, one per line.
# Fast path: the pid file alone when it names a live process (no fork; keeps a warm `up`
# cheap). With "all", or when the pid file is stale/missing, also scan with pgrep, so a
# daemon started by hand or with a lost pid file is still found.
live_pids() {
    local name=$1 pidfile=${2:-} mode=${3:-} pid=
    local -a found=()
    if [[ -n $pidfile && -r $pidfile ]]; then
        read -r pid <"$pidfile" || true
        if pid_live "$pid" "$name"; then
            found+=("$pid")
            if [[ $mode != all ]]; then
                printf '%s\n' "$pid"
                return 0
            fi
        fi
    fi
    while read -r p; do
        [[ $p == "$pid" ]] && continue
        pid_live "$p" "$name" && found+=("$p")
    done < <(pgrep -x "$name" || true)
    ((${#found[@]})) && printf '%s\n' "${found[@]}"
    return 0
}

is_running() { [[ -n $(live_pids "$1" "${2:-}") ]]; }

# stop_daemons TIMEOUT_S NAME:PIDFILE...: SIGTERM every live instance at once (parallel stop
# is what makes `down` take ~0.2 s instead of ~1 s), wait until all are gone or zombies,
# SIGKILL whatever is left after TIMEOUT_S. Removes the pid files.
stop_daemons() {
    local timeout=$1; shift
    local spec name pidfile deadline
    local -a pids=() specs=("$@")
    for spec in "${specs[@]}"; do
        name=${spec%%:*}; pidfile=${spec#*:}
        mapfile -t -O "${#pids[@]}" pids < <(live_pids "$name" "$pidfile" all)
    done
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        deadline=$(( $(now_us) + timeout * 1000000 ))
        while :; do
            local -a left=()
            for spec in "${specs[@]}"; do
                mapfile -t -O "${#left[@]}" left < <(live_pids "${spec%%:*}" "${spec#*:}" all)
            done
            ((${#left[@]})) || break
            if (( $(now_us) > deadline )); then
                log "still alive after ${timeout}s, sending SIGKILL: ${left[*]}"
                kill -KILL "${left[@]}" 2>/dev/null || true
                sleep 0.2
                break
            fi
            sleep 0.05
        done
    fi
    for spec in "${specs[@]}"; do
        pidfile=${spec#*:}
        [[ -n $pidfile ]] && rm -f "$pidfile"
    done
    return 0
}

# port_listening PORT: a TCP listener on PORT exists (read /proc/net/tcp{,6} rather than
# connecting, so slurmctld does not log a bogus zero-byte connection).
port_listening() {
    local hex
    printf -v hex '%04X' "$1"
    grep -qE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:0000 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# log_tails: last lines of every daemon log, for error messages.
log_tails() {
    local f
    for f in "$SLURM_CI_ROOT/log/slurmctld.log" "$SLURM_CI_ROOT/log/slurmd.log" \
             "$SLURM_CI_ROOT/log/slurmrestd.log" /var/log/munge/munged.log; do
        [[ -s $f ]] || continue
        printf -- '----- tail -n 15 %s\n' "$f" >&2
        tail -n 15 "$f" >&2
    done
}

# cancel_all_jobs WAIT_S: cancel every job while slurmctld still runs, and wait until none is
# active. This must happen before slurmd stops: slurmd's shutdown leaves job steps running,
# and an orphaned slurmstepd later reports "job N finished" to a fresh slurmctld, where job
# id N may by then belong to another job. %A is the plain numeric job id (an array's pending
# meta record shows its array job id), which scancel accepts. Prints the number cancelled.
cancel_all_jobs() {
    local wait_s=$1 deadline
    local -a ids=()
    if ! is_running slurmctld "$CTLD_PIDFILE" || ! port_listening "$SLURMCTLD_PORT"; then
        echo 0; return 0
    fi
    mapfile -t ids < <(squeue -h -o %A 2>/dev/null | sort -u)
    if ((${#ids[@]})); then
        scancel "${ids[@]}" 2>/dev/null || true
        # A job that traps SIGTERM stays COMPLETING for KillWait (5 s); allow a little more.
        deadline=$(( $(now_us) + wait_s * 1000000 ))
        while [[ -n $(squeue -h -t PD,CF,R,S,CG,RQ,RS,SO,ST -o %A 2>/dev/null) ]]; do
            if (( $(now_us) > deadline )); then
                log "jobs still active after ${wait_s}s; stopping the daemons anyway"
                break
            fi
            sleep 0.05
        done
    fi
    echo "${#ids[@]}"
}

# kill_stray_steps: job steps whose slurmd is gone (cancel timed out, or a crash). Only
# called when slurmd is not running, so every slurmstepd left is an orphan of this cluster.
# The job's processes are descendants of its slurmstepd (proctrack/linuxproc), possibly in
# another session, so they are found through the parent links, not by process group.
kill_stray_steps() {
    local -a steps=() kids=()
    mapfile -t steps < <(live_pids slurmstepd "" all)
    ((${#steps[@]})) || return 0
    log "killing leftover slurmstepd processes and their jobs: ${steps[*]}"
    mapfile -t kids < <(ps -e -o pid= -o ppid= | awk -v roots="${steps[*]}" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) want[r[i]] = 1 }
        { parent[$1] = $2 }
        END { do { more = 0; for (p in parent) if (!(p in want) && (parent[p] in want)) {
                  want[p] = 1; more = 1; print p } } while (more) }')
    ((${#kids[@]})) && kill -TERM "${kids[@]}" 2>/dev/null
    stop_daemons 5 "slurmstepd:"
    ((${#kids[@]})) && kill -KILL "${kids[@]}" 2>/dev/null
    return 0
}
