# A private PostgreSQL 15 server for a test or benchmark run, sourced by
# scripts/test.sh and bench/coordinator/alloc.sh: a fresh cluster in a
# temporary directory, owned by the `postgres` user (initdb refuses root),
# listening on a unix socket in that directory only (no TCP). Debian's
# package may have created and started a `main` cluster; it is not used.
#
#   pg_private_start   starts it, sets pg_dir and exports SANDOFF_TEST_POSTGRES
#                      (a URI of its `postgres` database); returns 1 where it
#                      cannot (not root, no PostgreSQL 15, no postgres user)
#   pg_private_url DB  a URI of database DB on it
#   pg_private_stop    stops it and removes its directory (call it from an
#                      EXIT trap, so a failed run stops it too)

pg_bin=/usr/lib/postgresql/15/bin
pg_dir=

pg_private_start() {
    if [ "$(id -u)" != 0 ] || [ ! -x "$pg_bin/initdb" ] || ! id postgres >/dev/null 2>&1; then
        return 1
    fi
    pg_dir=$(mktemp -d /tmp/sandoff-pg.XXXXXX)
    chmod 755 "$pg_dir"
    mkdir "$pg_dir/sock"
    chown postgres: "$pg_dir" "$pg_dir/sock"
    # Explicit checks: callers run this as a condition, where `set -e` is off.
    runuser -u postgres -- "$pg_bin/initdb" -D "$pg_dir/data" -U postgres -A trust \
        --no-instructions >"$pg_dir/initdb.log" 2>&1 ||
        { echo "PostgreSQL: initdb failed:" >&2; cat "$pg_dir/initdb.log" >&2; return 1; }
    runuser -u postgres -- "$pg_bin/pg_ctl" start -w -s -D "$pg_dir/data" -l "$pg_dir/server.log" \
        -o "-c listen_addresses='' -k $pg_dir/sock -c max_connections=200" ||
        { echo "PostgreSQL: the server did not start:" >&2; cat "$pg_dir/server.log" >&2; return 1; }
    SANDOFF_TEST_POSTGRES=$(pg_private_url postgres)
    export SANDOFF_TEST_POSTGRES
}

pg_private_url() {
    echo "postgresql:///$1?host=$pg_dir/sock&user=postgres"
}

pg_private_stop() {
    [ -n "$pg_dir" ] || return 0
    # Stopped through its data directory (pg_ctl reads the postmaster's pid
    # there), never by name: other servers on the machine stay up.
    if [ -f "$pg_dir/data/postmaster.pid" ]; then
        runuser -u postgres -- "$pg_bin/pg_ctl" stop -D "$pg_dir/data" -m immediate -s || true
    fi
    rm -rf "$pg_dir"
    pg_dir=
}
