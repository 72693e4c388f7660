#!/usr/bin/env bash
# Stop the test SLURM started by tests/slurm/up.sh: slurmd, slurmctld and (only if up.sh started it) munged,
# each by its pid file under STATE_DIR. Cancels leftover jobs first. Never kills processes by name.
#
#   tests/slurm/down.sh [STATE_DIR] [--purge]   # --purge also deletes STATE_DIR
set -uo pipefail

STATE="${1:-${MAMMOSEG_SLURM_STATE:-/tmp/mammoseg-slurm}}"
PURGE="${2:-}"

if [ -s "$STATE/etc/slurm.conf" ] && command -v scancel >/dev/null; then
    SLURM_CONF="$STATE/etc/slurm.conf" timeout 10 scancel --quiet --full --partition=debug 2>/dev/null || true
fi

stop() {  # stop NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL.
    local name="$1" pidfile="$2" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { echo "$name ($pid) ignored SIGTERM: SIGKILL" >&2; kill -KILL "$pid"; }
        echo "stopped $name ($pid)" >&2
    fi
    rm -f "$pidfile"
}

stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
stop munged "$STATE/munged.pid"

# The copies in /etc/slurm, only if up.sh wrote them.
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [ -f "$f" ] && head -n 2 "$f" | grep -qF "tests/slurm/up.sh"; then rm -f "$f"; fi
done

if [ "$PURGE" = "--purge" ]; then rm -rf "$STATE" "$STATE.apt.log"; fi
exit 0
