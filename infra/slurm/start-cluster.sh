#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine (Debian 12 or Ubuntu, as root), for
# croco's tests and for trying the `croco-slurm` work pool without a real cluster:
#
#   sudo infra/slurm/start-cluster.sh        # idempotent; prints the node at the end
#   sudo infra/slurm/stop-cluster.sh
#
# What it sets up: Debian's Slurm (22.05 on Debian 12) and munge, installed if missing;
# one node `localhost` with fake GPUs as a GRES (character devices made with mknod, which
# Slurm accepts and never opens); accounting through slurmdbd and MariaDB so `sacct`
# works. The daemons run in the foreground of nothing: no systemd, each started by hand
# with a pid file, and started only when not already running.
#
# Settings (environment):
#   SLURM_BASE        state, spool, logs, MariaDB data   (default /var/tmp/croco-slurm)
#   SLURM_FAKE_GPUS   fake GPUs on the node               (default 2; 0: no GRES)
#   SLURM_NODE_CPUS   CPUs the node advertises            (default: the real count; more
#                     than that is allowed: Slurm is told to trust the config)
#   SLURM_CLEAN=1     forget saved jobs before starting
# Exit status 0 means the node is up and idle (or running jobs) and sacct answers.
set -euo pipefail
t0=$(date +%s.%N)
BASE=${SLURM_BASE:-/var/tmp/croco-slurm}
NGPU=${SLURM_FAKE_GPUS:-2}
log() { printf '[start-cluster %6.2fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}')" "$*"; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || { echo "start-cluster.sh: run as root (it installs packages and starts daemons)" >&2; exit 2; }

# One cluster per machine: daemons started from another SLURM_BASE hold the ports.
for p in slurmctld slurmd slurmdbd; do
  pid=$(pgrep -x "$p" | head -1 || true)
  if [ -n "$pid" ] && ! { [ -s "$BASE/run/$p.pid" ] && [ "$(cat "$BASE/run/$p.pid")" = "$pid" ]; }; then
    echo "start-cluster.sh: $p (pid $pid) runs from another SLURM_BASE; stop it first" \
      "(SLURM_BASE=<that folder> infra/slurm/stop-cluster.sh)" >&2; exit 4
  fi
done

# 1. packages
missing=()
for cmd in slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-client munged:munge \
           slurmdbd:slurmdbd mariadbd:mariadb-server; do
  command -v "${cmd%%:*}" >/dev/null || missing+=("${cmd#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >"${TMPDIR:-/tmp}/croco-slurm-apt.log" 2>&1 || {
    log "apt-get install failed; updating the package lists once and retrying"
    apt-get update >/dev/null 2>&1
    apt-get install -y --no-install-recommends "${missing[@]}" >"${TMPDIR:-/tmp}/croco-slurm-apt.log" 2>&1 || {
      echo "start-cluster.sh: apt-get install ${missing[*]} failed; see ${TMPDIR:-/tmp}/croco-slurm-apt.log" >&2; exit 3; }
  }
fi

# 2. folders (MariaDB runs as `mysql`: every parent of BASE must be traversable by it)
[ "${SLURM_CLEAN:-0}" = 1 ] && rm -rf "$BASE/state" "$BASE/spool"
mkdir -p "$BASE"/{state,spool,log,run,dev,mysql,mysql-run} /etc/slurm /run/munge /run/mysqld \
  /var/log/munge /var/lib/munge
chmod 0755 "$BASE"
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0755 /run/munge; chmod 0700 /var/log/munge /var/lib/munge /etc/munge
chown mysql:mysql "$BASE/mysql" "$BASE/mysql-run" /run/mysqld
chmod 0700 "$BASE/state"   # job environments (which may hold secrets) are saved here
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key

# 3. slurm.conf, gres.conf, slurmdbd.conf
read -r REAL_CPUS REAL_MEM TOPO < <(slurmd -C | awk '/^NodeName/{t=""; for(i=1;i<=NF;i++){split($i,a,"="); if(a[1]=="CPUs")c=a[2]; if(a[1]=="RealMemory")m=a[2]; if(a[1]~/^(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)$/)t=t" "$i}; print c, m, t}')
CPUS=${SLURM_NODE_CPUS:-$REAL_CPUS}
OVERRIDE=""
if [ "$CPUS" != "$REAL_CPUS" ]; then TOPO=""; OVERRIDE="SlurmdParameters=config_overrides"; fi
MEM=$(( REAL_MEM * 95 / 100 ))   # a margin, so the node never drains for "Low RealMemory"
GRES_TYPES=""; GRES_NODE=""; gres=""
if [ "$NGPU" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$NGPU"
  for i in $(seq 0 $((NGPU - 1))); do   # 195: the nvidia major; no driver, never opened
    [ -c "$BASE/dev/fakegpu$i" ] || { rm -f "$BASE/dev/fakegpu$i"; mknod "$BASE/dev/fakegpu$i" c 195 "$i"; }
  done
  gres="NodeName=localhost Name=gpu File=$BASE/dev/fakegpu[0-$((NGPU - 1))]"
fi
conf=$(cat <<EOF
# written by croco's infra/slurm/start-cluster.sh
ClusterName=croco-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MinJobAge=600
KillWait=5
$GRES_TYPES
$OVERRIDE
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS $TOPO RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
dbd=$(cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=croco-local
StorageLoc=slurm_acct_db
EOF
)
changed=0
[ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" = "$conf" ] || { printf '%s\n' "$conf" >/etc/slurm/slurm.conf; changed=1; }
[ "$(cat /etc/slurm/gres.conf 2>/dev/null)" = "$gres" ] || { printf '%s\n' "$gres" >/etc/slurm/gres.conf; changed=1; }
dbd_changed=0
[ "$(cat /etc/slurm/slurmdbd.conf 2>/dev/null)" = "$dbd" ] || { printf '%s\n' "$dbd" >/etc/slurm/slurmdbd.conf; dbd_changed=1; }
chmod 0600 /etc/slurm/slurmdbd.conf

# 4. munged
running /run/munge/munged.pid || { log "starting munged"; runuser -u munge -- /usr/sbin/munged; }
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null || { echo "start-cluster.sh: munge does not work" >&2; exit 1; }

# 5. MariaDB and slurmdbd (accounting, for sacct)
if [ ! -d "$BASE/mysql/mysql" ]; then
  log "initialising MariaDB in $BASE/mysql"
  mariadb-install-db --user=mysql --datadir="$BASE/mysql" --auth-root-authentication-method=socket \
    --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1
fi
if ! running "$BASE/mysql-run/mariadb.pid"; then
  log "starting mariadbd"
  setsid /usr/sbin/mariadbd --user=mysql --datadir="$BASE/mysql" --socket=/run/mysqld/mysqld.sock \
    --skip-networking --pid-file="$BASE/mysql-run/mariadb.pid" --log-error="$BASE/log/mariadb.log" \
    --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
fi
for _ in $(seq 300); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'croco-local';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
if [ "$dbd_changed" = 1 ] && running "$BASE/run/slurmdbd.pid"; then
  kill "$(cat "$BASE/run/slurmdbd.pid")"; for _ in $(seq 50); do running "$BASE/run/slurmdbd.pid" || break; sleep 0.1; done
fi
running "$BASE/run/slurmdbd.pid" || { log "starting slurmdbd"; /usr/sbin/slurmdbd; }
for _ in $(seq 300); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.1; done
sacctmgr -n -P show cluster format=cluster | grep -qx croco-local || sacctmgr -i add cluster croco-local >/dev/null

# 6. slurmctld and slurmd
if [ "$changed" = 1 ]; then
  for p in slurmd slurmctld; do
    if running "$BASE/run/$p.pid"; then
      log "configuration changed: restarting $p"
      kill "$(cat "$BASE/run/$p.pid")"
      for _ in $(seq 100); do running "$BASE/run/$p.pid" || break; sleep 0.1; done
    fi
  done
fi
running "$BASE/run/slurmctld.pid" || { log "starting slurmctld"; /usr/sbin/slurmctld; }
running "$BASE/run/slurmd.pid" || { log "starting slurmd"; /usr/sbin/slurmd -N localhost; }

# 7. wait for the node, and for accounting to answer
st=""
for _ in $(seq 300); do
  st=$(sinfo -h -N -n localhost -o '%T' 2>/dev/null || true)
  case "$st" in idle|mixed|allocated|completing) break;; esac
  sleep 0.1
done
case "$st" in idle|mixed|allocated|completing) ;; *)
  echo "start-cluster.sh: node not ready (state '$st')" >&2
  tail -20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2; exit 1;; esac
for _ in $(seq 100); do sacct -n -X -S now >/dev/null 2>&1 && break; sleep 0.1; done
sacct -n -X -S now >/dev/null || { echo "start-cluster.sh: sacct does not answer" >&2; exit 1; }
log "cluster ready: node localhost is $st, $CPUS CPUs, $NGPU fake GPUs"
