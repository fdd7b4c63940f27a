#!/usr/bin/env bash
# Start a PostgreSQL server for tests: 127.0.0.1 only, as a non-root user, without systemd.
#
# Creates the database `tpb` owned by the role `tpb` (password `tpb`, CREATEDB so that tests can
# make fresh databases), writes the SQLAlchemy URL to $TPB_PG_DIR/url and prints it as
# `TPB_PG_URL=...`. Idempotent: a running server is reused.
#
# Env: TPB_PG_PORT (default 55432), TPB_PG_DIR (default /tmp/tpb-pg), TPB_PG_USER (the OS user
# that runs the server when this script runs as root; default postgres).
set -euo pipefail

PORT="${TPB_PG_PORT:-55432}"
DIR="${TPB_PG_DIR:-/tmp/tpb-pg}"
OS_USER="${TPB_PG_USER:-postgres}"
DATA="$DIR/data"
LOG="$DIR/postgres.log"
DB=tpb
ROLE=tpb
PASSWORD=tpb
URL="postgresql+psycopg2://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
T0=$SECONDS

log() { echo "[postgres.sh +$((SECONDS - T0))s] $*"; }

die() {
    echo "[postgres.sh] FAILED: $*" >&2
    [[ -f $LOG ]] && tail -n 30 "$LOG" >&2
    exit 1
}

find_bindir() {
    local d
    d=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
    [[ -n $d && -x $d/initdb ]] && echo "$d"
}

BIN=$(find_bindir || true)
if [[ -z $BIN ]]; then
    [[ $(id -u) == 0 ]] || die "PostgreSQL is not installed and installing it needs root"
    log "installing postgresql"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 postgresql >/tmp/tpb-pg-apt.log 2>&1 ||
        die "apt-get install postgresql failed (log: /tmp/tpb-pg-apt.log)"
    BIN=$(find_bindir) || die "no /usr/lib/postgresql/*/bin after installing postgresql"
fi

# as_owner CMD...: run CMD as the user that owns the server (never as root: postgres refuses it).
if [[ $(id -u) == 0 ]]; then
    id "$OS_USER" >/dev/null 2>&1 || die "user $OS_USER does not exist (set TPB_PG_USER)"
    AS_OWNER=(runuser -u "$OS_USER" --)
    mkdir -p "$DIR"
    chown "$OS_USER": "$DIR"
else
    AS_OWNER=()
    mkdir -p "$DIR"
fi
chmod 755 "$DIR"
as_owner() { "${AS_OWNER[@]}" "$@"; }

psql_admin() { as_owner "$BIN/psql" -X -q -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }

if [[ ! -s $DATA/PG_VERSION ]]; then
    log "initdb $DATA"
    as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 || {
        cat "$DIR/initdb.log" >&2
        die "initdb failed"
    }
fi

if as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1 &&
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
    log "already running on 127.0.0.1:$PORT"
else
    log "starting postgres on 127.0.0.1:$PORT"
    # setsid + closed stdio: the server must not hold the caller's terminal or pipes open.
    setsid "${AS_OWNER[@]}" "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=300" \
        start </dev/null >/dev/null 2>&1 || die "pg_ctl start failed"
fi

if [[ $(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'") != 1 ]]; then
    psql_admin -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" || die "CREATE ROLE failed"
fi
if [[ $(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'") != 1 ]]; then
    psql_admin -c "CREATE DATABASE $DB OWNER $ROLE" || die "CREATE DATABASE failed"
fi

echo "$URL" >"$DIR/url.tmp"
chmod 644 "$DIR/url.tmp"
mv "$DIR/url.tmp" "$DIR/url"
log "up: url in $DIR/url"
echo "TPB_PG_URL=$URL"
