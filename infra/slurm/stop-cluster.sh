#!/usr/bin/env bash
# Stop what start-cluster.sh started, by pid file, in reverse order. Saved jobs and the
# accounting database stay in SLURM_BASE; start-cluster.sh brings them back.
set -u
BASE=${SLURM_BASE:-/var/tmp/croco-slurm}
stop() {  # name pidfile
  local pid
  [ -s "$2" ] || { echo "$1: not running (no pid file)"; return 0; }
  pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; echo "$1: pid $pid killed"; else echo "$1: pid $pid stopped"; fi
  else
    echo "$1: not running (stale pid $pid)"
  fi
  rm -f "$2"
}
stop slurmd    "$BASE/run/slurmd.pid"
stop slurmctld "$BASE/run/slurmctld.pid"
stop slurmdbd  "$BASE/run/slurmdbd.pid"
stop mariadbd  "$BASE/mysql-run/mariadb.pid"
stop munged    /run/munge/munged.pid
