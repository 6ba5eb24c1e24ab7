#!/usr/bin/env bash
# Runs the test suite against throwaway PostgreSQL and Redis servers.
#
#   scripts/test-services.sh [PYTEST ARGS...]      (more arguments from $PYTEST_ARGS)
#
# 1. Installs the Debian packages the suite needs when they are missing (needs root).
# 2. Starts PostgreSQL 15 and Redis on 127.0.0.1, on free ports picked now, with all their
#    files under /tmp/gateway-test-<random>.
# 3. Runs .venv/bin/pytest with these variables set:
#      GATEWAY_TEST_SERVICES=1
#      GATEWAY_TEST_PG_URL      postgresql://postgres@127.0.0.1:PORT/gateway_test
#      GATEWAY_TEST_PG_PORT     GATEWAY_TEST_PG_BIN (pg_ctl and friends)  GATEWAY_TEST_PG_DATA
#      GATEWAY_TEST_PG_LOG      GATEWAY_TEST_PG_OS_USER (the user pg_ctl must run as)
#      GATEWAY_TEST_REDIS_URL   redis://127.0.0.1:PORT/0
#      GATEWAY_TEST_REDIS_PORT  GATEWAY_TEST_REDIS_CONF (restart with `redis-server $GATEWAY_TEST_REDIS_CONF`)
#    Port, listen address and socket directory are in the data directory's postgresql.conf, so a
#    test can stop PostgreSQL and start it again with only
#      runuser -u "$GATEWAY_TEST_PG_OS_USER" -- "$GATEWAY_TEST_PG_BIN/pg_ctl" \
#        -D "$GATEWAY_TEST_PG_DATA" -l "$GATEWAY_TEST_PG_LOG" -w start
# 4. Stops both servers and removes their files, whatever pytest did, and exits with pytest's status.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

PG_BIN=${GATEWAY_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}
PYTEST=${PYTEST:-$repo/.venv/bin/pytest}
START_TIMEOUT=60 # seconds for each server to answer

log() { printf 'test-services: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- packages --------------------------------------------------------------------------------

# have PATH-or-COMMAND: is this program here?
have() {
  case $1 in
    /*) [ -x "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# Installs Debian packages without letting their maintainer scripts start system-wide services
# (PostgreSQL on 5432, Prometheus on 9090): the suite starts its own servers.
apt_install() {
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: $*; run as root, or: sudo apt-get install $*"
  have apt-get || die "missing packages ($*) and no apt-get to install them"
  local policy=/usr/sbin/policy-rc.d added="" status=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# added by scripts/test-services.sh while it installs packages\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added=1
  fi
  log "installing: $*"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
  } || status=$?
  if [ -n "$added" ]; then rm -f "$policy"; fi
  [ "$status" -eq 0 ] || die "apt-get install $* failed (status $status)"
}

missing=()
have "$PG_BIN/initdb" && have "$PG_BIN/pg_ctl" && have "$PG_BIN/psql" || missing+=(postgresql)
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
have curl || missing+=(curl)
have promtool || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
have "$PG_BIN/pg_ctl" || die "$PG_BIN/pg_ctl not found after installing postgresql (set GATEWAY_TEST_PG_BIN)"
[ -x "$PYTEST" ] || die "$PYTEST not found: run \`make install\` first (or use \`make test\`)"

# PostgreSQL refuses to run as root: as root, run its programs as the postgres user.
if [ "$(id -u)" -eq 0 ]; then
  pg_user=postgres
  id "$pg_user" >/dev/null 2>&1 || die "no '$pg_user' user: is the postgresql package installed?"
  as_pg() { (cd / && runuser -u "$pg_user" -- "$@"); }
else
  pg_user=$(id -un)
  as_pg() { "$@"; }
fi

# --- clean-up, armed before anything is started --------------------------------------------------

run_dir=""
pg_data=""
redis_port=""

stop_postgres() {
  [ -n "$pg_data" ] && [ -f "$pg_data/postmaster.pid" ] || return 0
  as_pg timeout 40 "$PG_BIN/pg_ctl" -D "$pg_data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
    as_pg timeout 20 "$PG_BIN/pg_ctl" -D "$pg_data" -m immediate -w -t 10 stop >/dev/null 2>&1 ||
    true
  local pid
  pid=$(head -n 1 "$pg_data/postmaster.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    log "PostgreSQL (pid $pid) did not stop; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

stop_redis() {
  [ -n "$run_dir" ] || return 0
  local pid=""
  pid=$(cat "$run_dir/redis/redis.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "Redis (pid $pid) did not stop; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # A test may have restarted Redis some other way: whatever still answers on our port goes too.
  if [ -n "$redis_port" ] && [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" = PONG ]; then
    timeout 5 redis-cli -h 127.0.0.1 -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  fi
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  stop_postgres
  stop_redis
  if [ -n "$run_dir" ]; then rm -rf "$run_dir"; fi
  exit "$status"
}
# Ctrl-C reaches pytest too (same process group), so it is only waited for: it tears its fixtures
# down and stops. A TERM sent to this script alone is passed on to pytest as an interrupt.
pytest_pid=""
on_signal() {
  if [ -n "$pytest_pid" ]; then
    if [ "$1" = TERM ]; then kill -INT "$pytest_pid" 2>/dev/null || true; fi
    wait "$pytest_pid" 2>/dev/null || true
  fi
  exit "$2"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

# --- servers -------------------------------------------------------------------------------------

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Under /tmp rather than in the work tree: the postgres user must be able to reach it, and the
# socket path must stay short.
for _ in 1 2 3 4 5; do
  candidate=/tmp/gateway-test-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
  if mkdir -m 0755 "$candidate" 2>/dev/null; then
    run_dir=$candidate
    break
  fi
done
[ -n "$run_dir" ] || die "could not create a directory under /tmp"
pg_data=$run_dir/pgdata
pg_log=$run_dir/postgresql.log
mkdir -m 0700 "$pg_data" "$run_dir/redis"
touch "$pg_log"
if [ "$pg_user" != "$(id -un)" ]; then chown "$pg_user:" "$pg_data" "$pg_log"; fi

log "initdb in $pg_data"
as_pg "$PG_BIN/initdb" -D "$pg_data" -A trust -U postgres -E UTF8 --locale=C >"$run_dir/initdb.log" 2>&1 ||
  {
    cat "$run_dir/initdb.log" >&2
    die "initdb failed"
  }

pg_port=""
for attempt in 1 2 3; do
  port=$(free_port)
  # Later lines win, so a retry with another port just appends.
  cat >>"$pg_data/postgresql.conf" <<EOF
# scripts/test-services.sh, attempt $attempt
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$pg_data'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  if as_pg timeout $((START_TIMEOUT + 10)) "$PG_BIN/pg_ctl" -D "$pg_data" \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $pg_data" -l "$pg_log" -w -t "$START_TIMEOUT" start \
    >/dev/null; then
    pg_port=$port
    break
  fi
  log "PostgreSQL did not start on port $port (attempt $attempt):"
  tail -n 20 "$pg_log" >&2 || true
  stop_postgres
done
[ -n "$pg_port" ] || die "PostgreSQL would not start"
timeout 10 "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -t 5 || die "PostgreSQL does not answer on port $pg_port"
timeout 30 "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres \
  -c 'CREATE DATABASE gateway_test' || die "could not create database gateway_test"
log "PostgreSQL 127.0.0.1:$pg_port (data $pg_data)"

redis_conf=$run_dir/redis/redis.conf
for attempt in 1 2 3; do
  port=$(free_port)
  cat >"$redis_conf" <<EOF
bind 127.0.0.1
port $port
save ""
appendonly no
daemonize yes
pidfile $run_dir/redis/redis.pid
logfile $run_dir/redis/redis.log
dir $run_dir/redis
EOF
  redis_port=$port
  redis-server "$redis_conf" || true
  deadline=$((SECONDS + START_TIMEOUT))
  answered=""
  while [ "$SECONDS" -lt "$deadline" ]; do
    if [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
      answered=1
      break
    fi
    # It could not bind (or gave up otherwise): try another port.
    if grep -q -i -e 'could not create server' -e 'aborting' "$run_dir/redis/redis.log" 2>/dev/null; then break; fi
    sleep 0.1
  done
  [ -z "$answered" ] || break
  log "Redis did not start on port $port (attempt $attempt):"
  tail -n 20 "$run_dir/redis/redis.log" >&2 || true
  stop_redis
  redis_port=""
done
[ -n "$redis_port" ] || die "Redis would not start"
log "Redis 127.0.0.1:$redis_port"

export GATEWAY_TEST_SERVICES=1
export GATEWAY_TEST_PG_URL="postgresql://postgres@127.0.0.1:$pg_port/gateway_test"
export GATEWAY_TEST_PG_PORT=$pg_port
export GATEWAY_TEST_PG_BIN=$PG_BIN
export GATEWAY_TEST_PG_DATA=$pg_data
export GATEWAY_TEST_PG_LOG=$pg_log
export GATEWAY_TEST_PG_OS_USER=$pg_user
export GATEWAY_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
export GATEWAY_TEST_REDIS_PORT=$redis_port
export GATEWAY_TEST_REDIS_CONF=$redis_conf

# --- tests ---------------------------------------------------------------------------------------

extra=()
if [ -n "${PYTEST_ARGS:-}" ]; then read -r -a extra <<<"$PYTEST_ARGS"; fi
status=0
# In the background so that the traps above run at once. A background command would ignore
# Ctrl-C and read /dev/null: `trap - INT` and `<&0` give pytest both back (Ctrl-C, --pdb).
(
  trap - INT
  exec "$PYTEST" "${extra[@]}" "$@"
) <&0 &
pytest_pid=$!
wait "$pytest_pid" || status=$?
pytest_pid=""
if [ "$status" -eq 5 ]; then
  log "pytest collected no tests (exit 5): check the test paths and -k/-m filters"
fi
exit "$status"
