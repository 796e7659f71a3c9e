#!/bin/bash
# A local stand-in for the image docker-compose.yml runs, pgvector/pgvector:pg17, for machines that cannot pull
# from Docker Hub: Debian trixie's PostgreSQL 17 and pgvector, with an entrypoint that initialises the cluster from
# POSTGRES_USER / POSTGRES_PASSWORD(_FILE) / POSTGRES_DB as the official postgres image does. With it in the local
# image store, `docker compose up` uses it without pulling, and tests/test_compose.py runs its live test.
#
#   sudo tests/compose_image.sh [TAG]      (default tag: pgvector/pgvector:pg17)
#
# Needs root (debootstrap), debootstrap, and a running Docker daemon. MIRROR overrides the Debian mirror.
# Replaces the tag if it exists: do not run it where the real image is wanted.
set -euo pipefail

TAG=${1:-pgvector/pgvector:pg17}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
PG_MAJOR=17

die() { echo "compose_image.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap needs it): sudo $0"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
command -v docker >/dev/null || die "docker is missing: apt-get install docker.io"
docker info >/dev/null 2>&1 || die "no Docker daemon answers: start it (systemctl start docker, or dockerd &)"

ROOTFS=$(mktemp -d /var/tmp/gpt-sql-image.XXXXXX)
# A failed debootstrap can leave /proc and /sys mounted inside the rootfs; rm -rf must not descend into them.
cleanup() {
    for m in proc sys dev/pts dev; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

echo "compose_image.sh: debootstrap $SUITE into $ROOTFS (a few minutes)" >&2
debootstrap --variant=minbase --include="postgresql-$PG_MAJOR,postgresql-$PG_MAJOR-pgvector" \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 ||
    { tail -20 "$ROOTFS.log" >&2; die "debootstrap failed (log: $ROOTFS.log)"; }
rm -f "$ROOTFS.log"

# The package's postinst made a cluster "main" for a system service; the entrypoint makes its own in PGDATA.
rm -rf "$ROOTFS/etc/postgresql/$PG_MAJOR/main" "$ROOTFS/var/lib/postgresql/$PG_MAJOR/main"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
mkdir -p "$ROOTFS/var/lib/postgresql/data"
chroot "$ROOTFS" chown postgres:postgres /var/lib/postgresql/data

cat >"$ROOTFS/usr/local/bin/docker-entrypoint.sh" <<'ENTRYPOINT'
#!/bin/bash
# What the official postgres image's entrypoint does, for what gpt-sql's docker-compose.yml uses: on first start
# (no PG_VERSION in PGDATA) initdb as POSTGRES_USER with POSTGRES_PASSWORD or the contents of
# POSTGRES_PASSWORD_FILE, password auth for TCP, trust on the local socket, create POSTGRES_DB; then run postgres
# as the postgres user. A command other than postgres runs as given.
set -euo pipefail

if [ "${1:-}" != "" ] && [ "${1:0:1}" = "-" ]; then
    set -- postgres "$@"
fi
if [ "${1:-}" != "postgres" ]; then
    exec "$@"
fi

if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: both POSTGRES_PASSWORD and POSTGRES_PASSWORD_FILE are set" >&2
        exit 1
    fi
    POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
    export POSTGRES_PASSWORD
    unset POSTGRES_PASSWORD_FILE
fi
export POSTGRES_USER=${POSTGRES_USER:-postgres}
export POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    chmod 3775 /var/run/postgresql
    # the password file may be readable by root only: it was read above, and goes on in the environment
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
        echo "error: the database is uninitialized and no superuser password is given:" \
             "set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE" >&2
        exit 1
    fi
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") \
        --auth-local=trust --auth-host="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" -D "$PGDATA" >&2
    printf 'host all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    # A first start on the socket only, so nothing connects over TCP before the database exists.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >&2
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres --no-psqlrc -q \
            --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop >&2
    echo "PostgreSQL init process complete; ready for start up." >&2
fi
unset POSTGRES_PASSWORD
exec "$@"
ENTRYPOINT
chmod 755 "$ROOTFS/usr/local/bin/docker-entrypoint.sh"

echo "compose_image.sh: importing as $TAG" >&2
# The official image also sets STOPSIGNAL SIGINT (fast shutdown); docker import cannot, so a stop sends SIGTERM,
# a smart shutdown, which is as quick once clients have disconnected.
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV PGDATA=/var/lib/postgresql/data" \
    --change "ENV LANG=C.UTF-8" \
    --change "VOLUME /var/lib/postgresql/data" \
    --change "EXPOSE 5432" \
    --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
    --change 'CMD ["postgres"]' \
    --message "local stand-in for pgvector/pgvector:pg$PG_MAJOR (gpt-sql tests/compose_image.sh)" \
    - "$TAG" >/dev/null
echo "compose_image.sh: built $TAG" >&2
