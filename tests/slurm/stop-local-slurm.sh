#!/usr/bin/env bash
# Stop the local cluster that start-local-slurm.sh started from STATE_DIR: cancel its jobs, then
# send SIGTERM to every daemon it recorded (by PID, after checking the PID still names that
# daemon), all together; SIGKILL what is left after 20 s. Safe to run twice or on a half-started
# cluster. --wipe also removes the state directory.
#
#   tests/slurm/stop-local-slurm.sh [STATE_DIR] [--wipe]     (default: /tmp/mdt-local-slurm)
set -uo pipefail

BASE=${MDT_SLURM_DIR:-/tmp/mdt-local-slurm}
WIPE=0
for arg in "$@"; do
    case $arg in
        --wipe) WIPE=1 ;;
        *) BASE=$arg ;;
    esac
done
PIDS=$BASE/pids
export SLURM_CONF=$BASE/etc/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin
log() { echo "[stop-local-slurm] $*" >&2; }
wipe() {  # only a directory that start-local-slurm.sh made (it has a pids file)
    if [ "$WIPE" = 1 ] && [ -e "$BASE/pids" ]; then rm -rf "${BASE:?}"; fi
}

alive() { [ -n "$1" ] && [ -r "/proc/$1/comm" ] && [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2"* ]]; }

if [ ! -s "$PIDS" ]; then
    log "nothing recorded in $PIDS: nothing to stop"
    wipe
    exit 0
fi

# Jobs first: their slurmstepd processes outlive slurmd. Only jobs of this cluster are cancelled.
if [ -f "$SLURM_CONF" ] && timeout 5 scontrol ping >/dev/null 2>&1; then
    jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs >/dev/null 2>&1 || true
        end=$((SECONDS + 15))
        while [ -n "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $end ]; do sleep 0.3; done
    fi
fi

# Every slurmd's job steps (slurmstepd and their tasks) end with the jobs; signal the daemons in
# reverse start order, all at once, then wait for them together.
targets=()
while read -r name pid; do
    if alive "$pid" "$name"; then
        targets+=("$pid")
        log "stopping $name (pid $pid)"
    fi
done < <(tac "$PIDS")
if [ ${#targets[@]} -gt 0 ]; then
    kill -TERM "${targets[@]}" 2>/dev/null || true
    end=$((SECONDS + 20))
    while [ $SECONDS -lt $end ]; do
        left=()
        for pid in "${targets[@]}"; do [ -d "/proc/$pid" ] && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && break
        sleep 0.2
    done
    left=()
    for pid in "${targets[@]}"; do [ -d "/proc/$pid" ] && left+=("$pid"); done
    if [ ${#left[@]} -gt 0 ]; then
        log "SIGKILL to ${left[*]} (still running after 20 s)"
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
fi
: > "$PIDS"
rm -f "$BASE/env"
wipe
log "stopped"
exit 0
