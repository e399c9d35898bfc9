#!/usr/bin/env bash
# Start a real Slurm cluster on this one host, for the Slurm tests: munge, MariaDB + slurmdbd
# (accounting: sacct, which submitit needs), slurmctld and N emulated nodes (node1..nodeN, one
# slurmd each). Debian 12 as root, no systemd needed. Idempotent: a cluster that already runs
# from the same state directory is reused. Every daemon listens on a port found free now.
#
#   tests/slurm/start-local-slurm.sh [STATE_DIR]        (default: /tmp/mdt-local-slurm)
#   . STATE_DIR/env                                     (SLURM_CONF=..., to use the cluster)
#   tests/slurm/stop-local-slurm.sh [STATE_DIR]         (stops every daemon it started, by PID)
#
# Environment: MDT_SLURM_NODES (2), MDT_SLURM_CPUS (CPUs per emulated node: this host's),
# MDT_SLURM_NO_INSTALL=1 (fail instead of installing missing packages).
# Prints the env file's lines (SLURM_CONF=..., MDT_SLURM_DIR=...) on success.
# Facts behind the settings: README "Testing it on one machine" and the comments below.
set -euo pipefail

BASE=${1:-${MDT_SLURM_DIR:-/tmp/mdt-local-slurm}}
NODES=${MDT_SLURM_NODES:-2}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=mdtci
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { echo "[start-local-slurm +${SECONDS}s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
if [ -d "$BASE" ] && [ -n "$(ls -A "$BASE")" ] && [ ! -e "$BASE/pids" ]; then
    die "$BASE is not empty and holds no cluster of this script (no pids file): pick another STATE_DIR"
fi
mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd)
ENVFILE=$BASE/env
PIDS=$BASE/pids
export SLURM_CONF=$BASE/etc/slurm.conf

alive() {  # alive PID NAME: the process runs and its command name starts with NAME
    [ -n "$1" ] && [ -r "/proc/$1/comm" ] && [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2"* ]]
}

# ---------------------------------------------------------------- reuse a running cluster
if [ -s "$ENVFILE" ] && [ -s "$PIDS" ]; then
    ok=1
    while read -r name pid; do alive "$pid" "$name" || ok=0; done < "$PIDS"
    if [ "$ok" = 1 ] && timeout 10 sinfo -h >/dev/null 2>&1; then
        log "cluster in $BASE already runs; reusing it"
        cat "$ENVFILE"
        exit 0
    fi
    log "stale cluster state in $BASE: stopping what is left of it"
    "$HERE/stop-local-slurm.sh" "$BASE" >&2 || true
fi

# ---------------------------------------------------------------- packages
missing=()
for bin in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "${MDT_SLURM_NO_INSTALL:-0}" = 1 ] && die "missing ${missing[*]} (MDT_SLURM_NO_INSTALL=1)"
    log "installing ${PKGS[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${PKGS[@]}" >&2 || die "apt-get install failed"
fi
export PATH=$PATH:/usr/sbin:/sbin

# ---------------------------------------------------------------- free ports
used_ports() { ss -Hltn 2>/dev/null | awk '{n = split($4, a, ":"); print a[n]}'; }
port_free() {
    if command -v ss >/dev/null 2>&1; then
        if used_ports | grep -qx "$1"; then return 1; fi
    elif (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        return 1
    fi
    return 0
}
# A block of 3 + NODES free ports above Linux's ephemeral range (32768-60999) and away from the
# rendezvous ports of jobs (dist.py: 15000-34999, submitit: 20000-60000).
pick_ports() {
    local n=$1 start i ok _
    for _ in $(seq 1 200); do
        start=$((61000 + RANDOM % 4000))
        ok=1
        for ((i = 0; i < n; i++)); do port_free $((start + i)) || { ok=0; break; }; done
        [ "$ok" = 1 ] && { echo "$start"; return 0; }
    done
    return 1
}
P0=$(pick_ports $((3 + NODES))) || die "no block of $((3 + NODES)) free ports found"
DB_PORT=$P0; DBD_PORT=$((P0 + 1)); CTLD_PORT=$((P0 + 2)); NODE_PORT0=$((P0 + 3))
log "ports: mariadb $DB_PORT, slurmdbd $DBD_PORT, slurmctld $CTLD_PORT, slurmd $NODE_PORT0.."

# ---------------------------------------------------------------- layout (fresh state)
rm -rf "${BASE:?}/etc" "${BASE:?}/state" "${BASE:?}/spool" "${BASE:?}/log" "${BASE:?}/mysql" "${BASE:?}/run"
mkdir -p "$BASE/etc" "$BASE/state" "$BASE/spool" "$BASE/log" "$BASE/mysql" "$BASE/run"
chown slurm:slurm "$BASE/state" "$BASE/log" "$BASE/run"
chmod 755 "$BASE" "$BASE/etc" "$BASE/run" "$BASE/log"
: > "$PIDS"
rm -f "$ENVFILE"
cleanup_on_error() {
    log "start failed; logs in $BASE/log; stopping what was started"
    for f in "$BASE"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
    "$HERE/stop-local-slurm.sh" "$BASE" >&2 || true
}
trap cleanup_on_error ERR

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -ge $end ] && { log "timed out after ${t}s waiting for $what"; return 1; }
        sleep 0.2
    done
}
pid_from() {  # pid_from FILE SECONDS
    local end=$((SECONDS + $2))
    until [ -s "$1" ]; do [ $SECONDS -ge $end ] && return 1; sleep 0.1; done
    cat "$1"
}

# ---------------------------------------------------------------- munge
if timeout 5 sh -c 'munge -n | unmunge' >/dev/null 2>&1; then
    log "munge already works; using the running munged"
else
    [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null;
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force < /dev/null > "$BASE/log/munged.out" 2>&1
    echo "munged $(pid_from /run/munge/munged.pid 10)" >> "$PIDS"
    wait_for 10 munge sh -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------- MariaDB on loopback
log "munge ok; starting MariaDB"
DBPASS=mdt$RANDOM$RANDOM
chown mysql:mysql "$BASE/mysql"
mariadb-install-db --no-defaults --user=mysql --datadir="$BASE/mysql/data" \
    --auth-root-authentication-method=socket --skip-test-db > "$BASE/log/mariadb-install.log" 2>&1
chown -R mysql:mysql "$BASE/mysql"
mariadbd --no-defaults --user=mysql --datadir="$BASE/mysql/data" --socket="$BASE/mysql/sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$BASE/mysql/mariadbd.pid" \
    --skip-name-resolve --innodb-buffer-pool-size=64M --log-error="$BASE/log/mariadb.log" \
    < /dev/null > "$BASE/log/mariadb.out" 2>&1 &
disown
echo "mariadbd $(pid_from "$BASE/mysql/mariadbd.pid" 30)" >> "$PIDS"
wait_for 30 mariadb mariadb --no-defaults --socket="$BASE/mysql/sock" -uroot -e 'select 1'
mariadb --no-defaults --socket="$BASE/mysql/sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ---------------------------------------------------------------- configuration
CPUS=${MDT_SLURM_CPUS:-$(nproc)}
MEM_TOTAL=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
MEM=$(( ${MEM_TOTAL:-4096} * 9 / 10 / NODES ))
cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=slurm
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
chown slurm:slurm "$BASE/etc/slurmdbd.conf"
chmod 600 "$BASE/etc/slurmdbd.conf"

# AuthInfo cred_expire=10 and a 2 s scheduler interval: a requeued job starts again in ~12 s
# instead of ~170 s (LOCAL_SLURM.md). KillWait=5: a cancelled job's processes get 5 s after TERM.
cat > "$BASE/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
KillWait=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$NODE_PORT0-$((NODE_PORT0 + NODES - 1)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
chmod 644 "$BASE/etc/slurm.conf"
{ cat /etc/hosts; printf '127.0.0.1'; for i in $(seq 1 "$NODES"); do printf ' node%s' "$i"; done; echo; } > "$BASE/etc/hosts"
chmod 644 "$BASE/etc/hosts"

# ---------------------------------------------------------------- slurmdbd, slurmctld, slurmd
log "starting slurmdbd"
slurmdbd < /dev/null > "$BASE/log/slurmdbd.out" 2>&1
echo "slurmdbd $(pid_from "$BASE/run/slurmdbd.pid" 20)" >> "$PIDS"
wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
sacctmgr -i add cluster "$CLUSTER" > /dev/null 2>&1 || true

log "starting slurmctld"
slurmctld -i < /dev/null > "$BASE/log/slurmctld.out" 2>&1
CTLD_PID=$(pid_from "$BASE/run/slurmctld.pid" 20) || die "slurmctld did not start (see $BASE/log/slurmctld.log)"
echo "slurmctld $CTLD_PID" >> "$PIDS"
wait_for 30 slurmctld scontrol ping

# Node names do not resolve on this host: each slurmd (and so every job step it starts) sees a
# private /etc/hosts that maps node1..N to 127.0.0.1; the host's /etc/hosts is left alone.
for i in $(seq 1 "$NODES"); do
    mkdir -p "$BASE/spool/node$i"
    unshare --mount --propagation private \
        sh -c "mount --bind '$BASE/etc/hosts' /etc/hosts && exec slurmd -N node$i" \
        < /dev/null > "$BASE/log/slurmd-node$i.out" 2>&1
    echo "slurmd $(pid_from "$BASE/run/slurmd-node$i.pid" 20)" >> "$PIDS"
done

log "waiting for the nodes"
nodes_idle() { [ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" -ge "$NODES" ]; }
end=$((SECONDS + 60))
until nodes_idle; do
    if sinfo -h -N -t down,drain -o %N 2>/dev/null | grep -q .; then
        scontrol update nodename="node[1-$NODES]" state=resume >/dev/null 2>&1 || true
    fi
    [ $SECONDS -ge $end ] && { sinfo -N >&2 || true; die "nodes not idle after 60 s"; }
    sleep 0.3
done
trap - ERR

cat > "$ENVFILE" <<EOF
SLURM_CONF=$SLURM_CONF
MDT_SLURM_DIR=$BASE
MDT_SLURM_PARTITION=debug
MDT_SLURM_NODES=$NODES
EOF
log "cluster $CLUSTER up: $NODES nodes, state in $BASE"
cat "$ENVFILE"
