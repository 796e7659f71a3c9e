"""The floor gpt-sql needs of a server: its PostgreSQL and pgvector versions, checked before any work.

Why these (the query, sql/*.sql, as shipped):
- pgvector 0.7.0: `subvector` and `||` on vectors (vector_concat, also the vector_cat aggregate's step) came in 0.7.0,
  with halfvec (fp16 models); element-wise `*` and the vector sum/avg aggregates are older (0.5.0, 0.4.0).
  On 0.6.2 (the `pgserver` 0.1.4 wheel) a load fails at `vector_concat(vector, vector) does not exist`.
- PostgreSQL 14: string_to_table (the pre-tokenizer) and client_connection_check_interval (a session setting)
  came in 14; nothing the query uses is newer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

POSTGRES_FLOOR = 14
PGVECTOR_FLOOR = (0, 7, 0)
PGVECTOR_WHY = "subvector, || on vectors and halfvec came in 0.7"


class VersionError(Exception):
    """The server is below the floor, or pgvector is missing and this role may not create it."""


@dataclass(frozen=True)
class ServerVersions:
    postgres: str  # server_version, e.g. "18.6"
    postgres_major: int
    vector: str | None  # the installed extension's version in this database, None if not created
    vector_schema: str | None
    available: list[str]  # versions of pgvector the server's files can install or update to
    default: str | None  # the version CREATE EXTENSION vector / ALTER EXTENSION vector UPDATE would give
    database: str
    role: str


def parse(version: str) -> tuple[int, ...]:
    """'0.8.2' -> (0, 8, 2); a suffix such as '-dev' or 'beta1' is ignored."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("-")[0])[:3])


def floor_text() -> str:
    return ".".join(str(n) for n in PGVECTOR_FLOOR[:2])


def read(conn: psycopg.Connection) -> ServerVersions:
    """One round trip: the server's versions and what pgvector it offers."""
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int / 10000,"
        " e.extversion, n.nspname,"
        " ARRAY(SELECT version FROM pg_available_extension_versions WHERE name = 'vector'),"
        " (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'),"
        " current_database(), current_user"
        " FROM (SELECT 1) one LEFT JOIN pg_extension e ON e.extname = 'vector'"
        " LEFT JOIN pg_namespace n ON n.oid = e.extnamespace").fetchone()
    return ServerVersions(row[0].split()[0], row[1], row[2], row[3], list(row[4] or []), row[5], row[6], row[7])


def problem(v: ServerVersions) -> str | None:
    """What stops gpt-sql on this server, as one line for the user, or None."""
    need = f"gpt-sql needs pgvector >= {floor_text()} ({PGVECTOR_WHY})"
    if v.postgres_major < POSTGRES_FLOOR:
        return (f"this server is PostgreSQL {v.postgres}; gpt-sql needs PostgreSQL >= {POSTGRES_FLOOR} "
                f"(string_to_table came in 14)")
    newest = max(v.available, key=parse, default=None)
    if v.vector is not None and parse(v.vector) < PGVECTOR_FLOOR:
        if newest is not None and parse(newest) >= PGVECTOR_FLOOR:
            return (f"this server has pgvector {v.vector}; {need}: an administrator can run "
                    f"`ALTER EXTENSION vector UPDATE` in database {v.database} (the server has {newest} installed)")
        return (f"this server has pgvector {v.vector}; {need}: upgrade the server's pgvector package, then run "
                f"`ALTER EXTENSION vector UPDATE` in database {v.database}")
    if v.vector is None:
        if newest is None:
            return (f"this server has no pgvector; {need}: install it on the server, then an administrator runs "
                    f"`CREATE EXTENSION vector` in database {v.database}")
        if parse(v.default or newest) < PGVECTOR_FLOOR:
            return (f"this server offers pgvector {v.default or newest}; {need}: upgrade the server's pgvector "
                    f"package, then run `CREATE EXTENSION vector` in database {v.database}")
    if v.vector_schema is not None and v.vector_schema != "public":
        return (f"pgvector is in schema {v.vector_schema} of database {v.database}; gpt-sql needs it in public: an "
                f"administrator can run `ALTER EXTENSION vector SET SCHEMA public`")
    return None


def check(conn: psycopg.Connection) -> ServerVersions:
    """Raise VersionError, one line, if the server is below the floor; else its versions."""
    v = read(conn)
    message = problem(v)
    if message:
        raise VersionError(message)
    return v


def create_extension(conn: psycopg.Connection) -> None:
    """Create pgvector in this database if it is not there yet (inside the caller's transaction, so a refused load
    leaves nothing); VersionError if this role may not: only an administrator can then."""
    v = check(conn)
    if v.vector is not None:
        return  # not even CREATE EXTENSION IF NOT EXISTS: some managed servers refuse the statement to a plain role
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION vector")
    # a plain role; or a service that allows only the extensions its settings list (FeatureNotSupported)
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.FeatureNotSupported) as e:
        raise VersionError(
            f"pgvector is not enabled in database {v.database} and role {v.role} may not create it "
            f"({e.diag.message_primary}): an administrator must run `CREATE EXTENSION vector` in it") from None


_checked: set[tuple] = set()


def check_once(conn: psycopg.Connection) -> None:
    """check(conn), once per server and database in this process (a command may connect many times); leaves no
    transaction open."""
    info = conn.info
    key = (info.host, info.port, info.dbname, info.user)
    if key in _checked:
        return
    try:
        check(conn)
    finally:
        if not conn.autocommit and not conn.closed:
            conn.rollback()
    _checked.add(key)
