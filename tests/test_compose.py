"""docker-compose.yml: pgvector image, localhost-only port, password from the environment, healthcheck, volume,
server settings. Parsed with PyYAML; no Docker needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE.is_file(), f"{COMPOSE} is missing"
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def db(compose) -> dict:
    assert "db" in compose["services"], "no `db` service"
    return compose["services"]["db"]


def _environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", "KEY"]
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _settings(service: dict) -> dict[str, str]:
    cmd = service.get("command")
    if isinstance(cmd, str):
        cmd = cmd.split()
    assert isinstance(cmd, list) and cmd, "the db service sets no server command"
    assert cmd[0] == "postgres"
    out = {}
    args = [str(a) for a in cmd[1:]]
    for i, a in enumerate(args):
        if a == "-c":
            key, _, value = args[i + 1].partition("=")
            out[key] = value
        elif a.startswith("-c") and len(a) > 2:
            key, _, value = a[2:].partition("=")
            out[key] = value
        elif a.startswith("--") and "=" in a:
            key, _, value = a[2:].partition("=")
            out[key.replace("-", "_")] = value
    return out


def _size_bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)b?", str(size).strip().lower())
    assert m, f"unreadable size {size!r}"
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")


def test_image_is_pgvector_pg15_or_newer(db):
    m = re.fullmatch(r"(?:docker\.io/)?pgvector/pgvector:pg(\d+)(?:[-.].*)?", db.get("image", ""))
    assert m, f"image {db.get('image')!r} is not pgvector/pgvector:pgNN"
    assert int(m.group(1)) >= 15


def test_port_bound_to_localhost_only(db):
    ports = db.get("ports") or []
    assert ports, "no published port"
    for p in ports:
        if isinstance(p, dict):  # long syntax
            assert p.get("host_ip") == "127.0.0.1", p
            assert int(p["target"]) == 5432
            continue
        m = re.fullmatch(r"(?P<ip>[^:]+):(?P<host>\$\{[^}]*\}|\d+):(?P<container>\d+)(?:/tcp)?", str(p))
        assert m, f"port {p!r} does not name a host IP (it would listen on all interfaces)"
        assert m.group("ip") == "127.0.0.1", p
        assert m.group("container") == "5432"


def test_password_from_environment_without_default(db, compose):
    env = _environment(db)
    pw = env.get("POSTGRES_PASSWORD")
    assert pw is not None, "POSTGRES_PASSWORD is not passed to the container"
    # ${VAR:?msg} / ${VAR?msg}: compose fails when unset; ${VAR:-x} / ${VAR-x} / literals would bake one in.
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:?\?[^}]*\}", pw), f"POSTGRES_PASSWORD is {pw!r}"
    assert env.get("POSTGRES_HOST_AUTH_METHOD", "") not in ("trust",)
    assert "POSTGRES_PASSWORD_FILE" not in env
    text = COMPOSE.read_text(encoding="utf-8")
    assert "POSTGRES_PASSWORD:-" not in text and "POSTGRES_PASSWORD-" not in text


def test_user_and_db_default_to_gpt(db):
    env = _environment(db)
    assert env.get("POSTGRES_USER") == "${POSTGRES_USER:-gpt}"
    assert env.get("POSTGRES_DB") == "${POSTGRES_DB:-gpt}"


def test_healthcheck_uses_pg_isready(db):
    hc = db.get("healthcheck")
    assert isinstance(hc, dict) and not hc.get("disable"), "no healthcheck"
    test = hc.get("test")
    assert "pg_isready" in (" ".join(test) if isinstance(test, list) else str(test))


def test_named_volume_declared_and_used(db, compose):
    declared = compose.get("volumes") or {}
    assert declared, "no top-level named volume"
    mounts = []
    for v in db.get("volumes") or []:
        if isinstance(v, dict):
            if v.get("type", "volume") == "volume":
                mounts.append((v.get("source"), v.get("target")))
        else:
            src, _, rest = str(v).partition(":")
            mounts.append((src, rest.split(":")[0]))
    data = [(s, t) for s, t in mounts if t in ("/var/lib/postgresql/data", "/var/lib/postgresql")]
    assert data, f"no volume for the data directory among {mounts}"
    for src, _ in data:
        assert src in declared, f"{src!r} is a bind mount or undeclared volume"


def test_server_settings(db):
    s = _settings(db)
    assert "shared_buffers" in s
    shared = _size_bytes(s["shared_buffers"])
    assert shared >= 512 * 1024**2, "GPT-2 124M fp32 weights alone are ~500 MB"
    assert s.get("jit") == "off"
    assert "work_mem" in s
    shm = db.get("shm_size")
    assert shm is not None, "shm_size is needed with large shared_buffers"
    assert _size_bytes(shm) >= 1024**3
