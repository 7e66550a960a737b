#!/bin/bash
# Runs PostgreSQL like the official postgres image: on an empty PGDATA it runs initdb with
# POSTGRES_USER (default postgres) and POSTGRES_PASSWORD (required unless
# POSTGRES_HOST_AUTH_METHOD=trust), creates POSTGRES_DB (default: the user's name), allows
# password logins from any address and listens on all of the container's interfaces; then
# runs the command ("postgres" plus any -c settings) as user postgres.
set -euo pipefail
if [ "$#" = 0 ] || [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi
export PGDATA=${PGDATA:-/var/lib/postgresql/data}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
        echo "error: database is uninitialized and POSTGRES_PASSWORD is not set" >&2
        echo "  (set POSTGRES_PASSWORD, or POSTGRES_HOST_AUTH_METHOD=trust to allow logins without one)" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
    chown postgres "$pwfile"
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words, as in the official image
    as_postgres initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        ${POSTGRES_INITDB_ARGS:-} >/dev/null
    rm -f "$pwfile"
    echo "host all all all $auth" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [ "$db" != postgres ]; then
        quoted=${db//\"/\"\"}
        echo "CREATE DATABASE \"$quoted\"" | as_postgres postgres --single -D "$PGDATA" postgres >/dev/null
    fi
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$@"
