# shellcheck shell=bash
# schedulers/htcondor/env.sh: source this (`. schedulers/htcondor/env.sh`) to get the facts of
# the local HTCondor pool (Debian trixie minicondor in a chroot, started by
# schedulers/htcondor/up) as environment variables, for tests, CI and shells:
#
#   CONDOR_CONFIG          the HOST-side client config written by `up`; set it before
#                          `import htcondor2` (default $HTCONDOR_STATE/condor_config)
#   HTCONDOR_CHROOT        the chroot holding the pool          default /srv/pvw-htcondor-trixie
#   HTCONDOR_STATE         host state dir (client config, token dir, facts, logs)
#                                                               default /tmp/pvw-htcondor
#   HTCONDOR_USER          submit user, same name+uid on host and in the chroot
#                                                               default pvwcondor
#   HTCONDOR_UID           its uid (= gid)                      default 2101
#   HTCONDOR_IDENTITY      the IDTOKENS identity root submits as, e.g. pvwcondor@vm
#   HTCONDOR_TOKEN_DIR     root-only token dir (SEC_TOKEN_SYSTEM_DIRECTORY of the client config)
#   HTCONDOR_COLLECTOR     127.0.0.1:9618
#   HTCONDOR_VENV          venv INSIDE the chroot with wslink   /opt/pvw-venv
#   HTCONDOR_PYTHON        its python, as a job sees it          /opt/pvw-venv/bin/python
#   HTCONDOR_REPO          the repo, bind-mounted read-only at the same path in the chroot
#   HTCONDOR_VERSION       the pool's HTCondor version (e.g. 23.9.6), once `up` has run
#   HTCONDOR_UP            1 if the pool's condor_master is running, else 0
#
# Safe to source from any shell setting: no `set -e`, no output, no side effects besides the
# variables. Costs no fork (reads the facts file `up` writes and /proc).

export HTCONDOR_CHROOT="${HTCONDOR_CHROOT:-/srv/pvw-htcondor-trixie}"
export HTCONDOR_STATE="${HTCONDOR_STATE:-/tmp/pvw-htcondor}"
export HTCONDOR_USER="${HTCONDOR_USER:-pvwcondor}"
export HTCONDOR_TOKEN_DIR="$HTCONDOR_STATE/tokens.d"
export HTCONDOR_COLLECTOR=127.0.0.1:9618
export HTCONDOR_VENV=/opt/pvw-venv
export HTCONDOR_PYTHON="$HTCONDOR_VENV/bin/python"
export CONDOR_CONFIG="$HTCONDOR_STATE/condor_config"

_htcondor_env() {
    local key val uid='' ident='' ver='' repo='' pid='' stat rest comm up=0
    local src=${BASH_SOURCE[0]}
    # Facts written by `up` (plain KEY=VALUE lines; parsed, not sourced).
    if [[ -r $HTCONDOR_STATE/htcondor.env ]]; then
        while IFS='=' read -r key val; do
            case $key in
                HTCONDOR_UID) uid=$val ;;
                HTCONDOR_IDENTITY) ident=$val ;;
                HTCONDOR_VERSION) ver=$val ;;
                HTCONDOR_REPO) repo=$val ;;
            esac
        done <"$HTCONDOR_STATE/htcondor.env"
    fi
    export HTCONDOR_UID="${HTCONDOR_UID:-${uid:-2101}}"
    export HTCONDOR_IDENTITY="${ident:-$HTCONDOR_USER@${HOSTNAME%%.*}}"
    export HTCONDOR_VERSION="$ver"
    # The repo: as recorded by `up`, else derived from this file's path (no fork).
    if [[ -z $repo ]]; then
        [[ $src == /* ]] || src=$PWD/$src
        while [[ $src == *//* || $src == */./* ]]; do src=${src//\/\//\/}; src=${src//\/.\//\/}; done
        repo=${src%/schedulers/htcondor/env.sh}
        [[ $repo == "$src" ]] && repo=''
    fi
    export HTCONDOR_REPO="${HTCONDOR_REPO:-$repo}"

    # Up = the pid file written by condor_master names a live (non-zombie) condor_master.
    [[ -r $HTCONDOR_CHROOT/run/condor/condor_master.pid ]] && read -r pid <"$HTCONDOR_CHROOT/run/condor/condor_master.pid"
    if [[ $pid =~ ^[0-9]+$ ]] && { read -r stat <"/proc/$pid/stat"; } 2>/dev/null; then
        comm=${stat#*(}; comm=${comm%)*}
        rest=${stat##*) }
        [[ $comm == condor_master && ${rest%% *} != [ZX] ]] && up=1
    fi
    export HTCONDOR_UP="$up"
}
_htcondor_env
unset -f _htcondor_env
