#!/usr/bin/env bash
# customScript.sh HOST USER PORT PROGRAM [ARGS...]
#
# The seed's "custom script that ssh-es to the compute host", rewritten for
# pvw-hpc. The launcher runs it as the session's process (e.g.
#   "cmd": ["customScript.sh", "${host}", "pvw-user", "${port}",
#           "/opt/pvw/bin/python", "/opt/pvw/app.py", "--host", "${host}",
#           "--port", "${port}", "--authKey", "${secret}"])
# and it runs PROGRAM ARGS... as USER on HOST. PORT is the seed's third
# argument: it is validated here, but the app only learns it from ARGS. The app's stdout and stderr come back on this script's stdout, byte for
# byte as they are written, so the launcher sees wslink's ready line
# ("wslink: Starting factory", written without a newline) at once. When the
# app ends by itself, this script exits with the app's exit code (255: ssh
# itself failed, e.g. host unreachable or login refused).
#
# Stopping. The launcher stops a session with SIGTERM, then SIGKILL, to this
# script's process group on the launcher host. Killing ssh does NOT stop a
# command started with plain `ssh host cmd`: without a terminal sshd just
# closes the pipes and the app runs on (as an orphan that keeps the port).
# What works, and why this one was chosen:
#
#   * The remote side runs a small bash wrapper: it starts the app in its own
#     session/process group (setsid), and a watcher reads the ssh channel's
#     stdin until EOF. EOF comes whenever the ssh link ends for any reason:
#     ssh got SIGTERM or SIGKILL, this script died (it holds the write end of
#     ssh's stdin, see the coproc below), or sshd gave up on a silent client
#     (ClientAliveInterval). The watcher then sends SIGTERM to the app's
#     whole process group, and SIGKILL after PVW_REMOTE_GRACE seconds (3).
#   * ssh's stdin must therefore stay open while the session lives, and not
#     be the launcher's: the launcher gives /dev/null, which would read as
#     EOF at once and stop the app immediately. A coproc gives ssh a pipe
#     whose only writer is this script, so it never sends data, and its end
#     is closed exactly when this script ends.
#   * Rejected: `ssh -tt` (sshd hangs up the remote pty and the kernel sends
#     SIGHUP). It works for a plain app, but an app or a child that ignores
#     SIGHUP, or one in another process group, survives; the pty turns "\n"
#     into "\r\n" in the log and merges streams at the terminal; and the login
#     is recorded in utmp/wtmp. A local trap that ssh-es a `kill` needs a
#     second login at stop time, fails when the link is down, and never runs
#     on SIGKILL.
#
# Remote requirements: USER's login shell must be bash-compatible (arguments
# are quoted with bash's printf %q), and bash and setsid must be on its PATH.
#
# Environment:
#   PVW_SSH_CONFIG     ssh client config, passed as `ssh -F` (tests use it to
#                      be hermetic). Put ServerAliveInterval/CountMax in the
#                      ssh config so a dead link ends the session.
#   PVW_REMOTE_GRACE   seconds between SIGTERM and SIGKILL on the remote side.
#
# Exit codes: 2 bad arguments; 255 ssh failed; otherwise the app's own.

set -euo pipefail

usage() {
    echo "usage: ${0##*/} HOST USER PORT PROGRAM [ARGS...]" >&2
    exit 2
}
die() {
    echo "${0##*/}: $*" >&2
    exit 2
}

[[ $# -ge 4 ]] || usage
host=$1 user=$2 port=$3
shift 3

# Validated because they end up in ssh's command line; a leading "-" would be an option.
[[ ${#host} -le 253 && $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] \
    || die "invalid host '$host' (letters, digits, '.' and '-' only: a hostname or IPv4 address)"
[[ $user =~ ^[A-Za-z_][A-Za-z0-9._-]{0,31}$ ]] \
    || die "invalid user '$user' (a POSIX user name: letters, digits, '.', '_', '-'; not starting with '-')"
if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "invalid port '$port' (an integer 1-65535)"
fi
port=$((10#$port))
grace=${PVW_REMOTE_GRACE:-3}
[[ $grace =~ ^[0-9]{1,3}$ ]] || die "invalid PVW_REMOTE_GRACE '$grace' (whole seconds)"

# The remote wrapper, run by bash on HOST with the app's argv as "$@" (see the header).
# Its own stderr goes to the app's stream too, so a missing program is reported in the log.
# shellcheck disable=SC2016  # expanded remotely, not here
wrapper='
exec 2>&1 3<&0
setsid "$@" </dev/null 3<&- &
app=$!
{
    while read -r _; do :; done
    kill -TERM -- "-$app" 2>/dev/null || exit 0
    for ((i = 0; i < 10 * PVW_REMOTE_GRACE; i++)); do
        kill -0 -- "-$app" 2>/dev/null || exit 0
        sleep 0.1
    done
    kill -KILL -- "-$app" 2>/dev/null
} <&3 >/dev/null 2>&1 &
watch=$!
exec 3<&-
trap "kill -TERM -- -$app 2>/dev/null" HUP INT TERM
while :; do
    wait "$app" && rc=0 || rc=$?
    kill -0 "$app" 2>/dev/null || break
done
kill "$watch" 2>/dev/null
kill -TERM -- "-$app" 2>/dev/null
exit "$rc"
'

remote="PVW_REMOTE_GRACE=$grace exec bash -c $(printf '%q' "$wrapper") pvw-remote"
for arg in "$@"; do
    remote+=" $(printf '%q' "$arg")"
done

ssh_opts=(-T -o BatchMode=yes)
if [[ -n ${PVW_SSH_CONFIG:-} ]]; then
    ssh_opts=(-F "$PVW_SSH_CONFIG" "${ssh_opts[@]}")
fi

# ssh's stdin: a pipe only this script writes to (never does), closed when it dies.
exec 4>&1
# shellcheck disable=SC2034  # SSH names the coproc; its pid is SSH_PID
coproc SSH { exec ssh "${ssh_opts[@]}" -l "$user" -- "$host" "$remote" >&4 4>&-; }
exec 4>&-
# shellcheck disable=SC2153
ssh_pid=$SSH_PID  # bash unsets SSH_PID once the coproc is reaped
rc=0
wait "$ssh_pid" || rc=$?
exit "$rc"
