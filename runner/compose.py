"""The docker compose server of the current directory: gpt-sql's docker-compose.yml there, brought up at least once,
so that its init service wrote the password (and the port, user and database it was started with) to .gpt-sql/."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import make_conninfo

COMPOSE_FILE = "docker-compose.yml"
STATE_DIR = ".gpt-sql"
HOST = "127.0.0.1"  # the compose file publishes the port there and nowhere else
DEFAULTS = {"port": "5432", "user": "gpt", "database": "gpt"}
# gpt-sql's compose file mounts its state dir; another project's docker-compose.yml does not, and is none of ours
MARKER = re.compile(r"^\s*-\s*[\"']?\./\.gpt-sql:", re.MULTILINE)


class ComposeError(Exception):
    """The compose state is there but cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ComposeServer:
    port: int
    user: str
    database: str
    password: str

    @property
    def where(self) -> str:
        return f"the docker compose server at {HOST}:{self.port} (./{COMPOSE_FILE})"

    def dsn(self) -> str:
        return make_conninfo(host=HOST, port=self.port, user=self.user, dbname=self.database, password=self.password)


def find(directory: Path | None = None) -> ComposeServer | None:
    """The server of `directory` (default: the current one), or None when it has no compose state of gpt-sql's."""
    directory = Path.cwd() if directory is None else directory
    compose, password_file = directory / COMPOSE_FILE, directory / STATE_DIR / "password"
    if not password_file.exists() or not _is_ours(compose):
        return None
    try:
        password = password_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ComposeError(f"cannot read {STATE_DIR}/password of ./{COMPOSE_FILE}: {getattr(e, 'strerror', None) or e}"
                           f" (it should belong to you: run `docker compose up -d` again, or give --dsn)") from None
    if not password:
        raise ComposeError(f"{STATE_DIR}/password of ./{COMPOSE_FILE} is empty: delete it after "
                           f"`docker compose down -v`, then `docker compose up -d`")
    settings = _settings(directory)
    try:
        port = int(settings["port"])
    except ValueError:
        raise ComposeError(f"GPT_SQL_PORT of ./{COMPOSE_FILE} is not a port number: {settings['port']!r}") from None
    return ComposeServer(port, settings["user"], settings["database"], password)


def _is_ours(compose: Path) -> bool:
    try:
        return bool(MARKER.search(compose.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


def _settings(directory: Path) -> dict[str, str]:
    """What the init service recorded at the last `up` (.gpt-sql/server); without that record, what compose would
    read now: GPT_SQL_PORT from the environment or .env, else the compose file's defaults."""
    recorded = _key_values(directory / STATE_DIR / "server")
    if recorded:
        return {**DEFAULTS, **{k: v for k, v in recorded.items() if k in DEFAULTS and v}}
    port = os.environ.get("GPT_SQL_PORT") or _key_values(directory / ".env").get("GPT_SQL_PORT")
    return {**DEFAULTS, **({"port": port} if port else {})}


def _key_values(path: Path) -> dict[str, str]:
    """KEY=value lines, as in a .env file: comments and blank lines skipped, quotes around a value removed."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def unreachable(server: ComposeServer, reason: str) -> str:
    """The one-line error when the server does not take the connection, with what to do."""
    # libpq's "connection failed: connection to server at "127.0.0.1", port 5432 failed: " repeats what we name
    reason = re.sub(r"^.*\bport \d+ failed:\s*", "", reason) or reason
    if "password authentication failed" in reason:
        return (f"{server.where} refused the password in {STATE_DIR}/password ({reason}): its data volume was made "
                f"with another one; `docker compose down -v` resets the server (its loaded models are lost), "
                f"or give --dsn")
    return (f"{server.where} does not answer ({reason}): start it with `docker compose up -d` in this directory "
            f"(`docker-compose up -d` where Docker has no compose plugin), or give --dsn (or DATABASE_URL) for another "
            f"server")
