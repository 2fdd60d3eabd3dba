# shellcheck shell=bash
# schedulers/slurm/env.sh: source this (`. schedulers/slurm/env.sh`) to get the facts of the
# CI Slurm cluster as environment variables, for tests, configs and shells:
#
#   SLURM_CI_ROOT        state dir (logs in $SLURM_CI_ROOT/log)      default /tmp/slurm-ci
#   SLURM_CI_USER        unprivileged test user                        default slurmtest
#   SLURM_CI_NODE        the node name (= `hostname -s`)
#   SLURM_CI_PARTITION   debug (the only, default partition)
#   SLURM_CI_CPUS        CPUs the node advertises (as written by `up`; empty before it ran)
#   SLURM_CI_CONF        /etc/slurm/slurm.conf
#   SLURM_CI_JOBCOMP     the jobcomp/filetxt file that `sacct -c` reads
#   SLURM_CI_UP          1 if slurmctld and slurmd are running, else 0
#   SLURM_CI_RESTD_URL   http://127.0.0.1:PORT (jwt) or unix:/path.sock (unix), only while
#                        slurmrestd runs; unset otherwise
#
# and a function `slurm_ci_token [USER] [LIFESPAN_S]` that prints a bare JWT (for the
# X-SLURM-USER-TOKEN header; needs root, as `scontrol token` does for another user).
#
# Safe to source from any shell setting: no `set -e`, no output, no side effects besides the
# variables and the function. Costs no fork when `up` has run (reads its facts file).

export SLURM_CI_ROOT="${SLURM_CI_ROOT:-/tmp/slurm-ci}"
export SLURM_CI_USER="${SLURM_CI_USER:-slurmtest}"
export SLURM_CI_PARTITION=debug
export SLURM_CI_CONF=/etc/slurm/slurm.conf
export SLURM_CI_JOBCOMP="$SLURM_CI_ROOT/log/jobcomp.log"

_slurm_ci_env() {
    local key val node='' cpus='' url='' pid stat rest name up=1
    # Facts written by `up` (plain KEY=VALUE lines; parsed, not sourced).
    if [[ -r $SLURM_CI_ROOT/run/ci.env ]]; then
        while IFS='=' read -r key val; do
            case $key in
                SLURM_CI_NODE) node=$val ;;
                SLURM_CI_CPUS) cpus=$val ;;
                SLURM_CI_RESTD_URL) url=$val ;;
            esac
        done <"$SLURM_CI_ROOT/run/ci.env"
    fi
    [[ -n $node ]] || node=$(hostname -s)
    export SLURM_CI_NODE="$node"
    export SLURM_CI_CPUS="$cpus"

    # alive NAME PIDFILE: the pid file names a live, non-zombie process called NAME.
    for name in slurmctld slurmd slurmrestd; do
        pid=''
        [[ -r $SLURM_CI_ROOT/run/$name.pid ]] && read -r pid <"$SLURM_CI_ROOT/run/$name.pid"
        stat=''
        [[ $pid =~ ^[0-9]+$ ]] && { read -r stat <"/proc/$pid/stat"; } 2>/dev/null
        rest=${stat##*) }
        if [[ -z $stat || $stat != *"($name)"* || ${rest%% *} == [ZX] ]]; then
            case $name in
                slurmrestd) url='' ;;
                *) up=0 ;;
            esac
        fi
    done
    export SLURM_CI_UP="$up"
    if [[ -n $url ]]; then
        export SLURM_CI_RESTD_URL="$url"
    else
        unset SLURM_CI_RESTD_URL
    fi
}
_slurm_ci_env
unset -f _slurm_ci_env

# slurm_ci_token [USER] [LIFESPAN_S]: print a JWT for USER (default $SLURM_CI_USER).
# `scontrol token` prints "SLURM_JWT=<token>"; strip the prefix.
slurm_ci_token() {
    local out
    out=$(scontrol token username="${1:-$SLURM_CI_USER}" lifespan="${2:-600}") || return
    printf '%s\n' "${out#SLURM_JWT=}"
}
