"""docker-compose.yml and gpt-sql's use of it. Static checks of the file (parsed with PyYAML), its init script run
here with sh, gpt-sql's discovery of the compose server of the current directory, and, where a Docker daemon and
the image are there, the real stack started and used from the CLI as a user would (tests/compose_image.sh builds
a stand-in image where Docker Hub cannot be reached)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gpt_sql.runner import compose as compose_mod
from gpt_sql.runner.db import DatabaseError, resolve_dsn

from conftest import require

yaml = require("yaml", reason="PyYAML is not installed (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DATA = "/var/lib/postgresql/data"
# What chooses a server before the compose one; the tests of discovery start without any of them.
CHOOSERS = ("DATABASE_URL", "PGHOST", "PGDATABASE", "GPT_SQL_DATA", "GPT_SQL_PORT")


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


@pytest.fixture(scope="module")
def init(compose) -> dict:
    assert "init" in compose["services"], "no `init` service (it makes the password)"
    return compose["services"]["init"]


def _environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", "KEY"]
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume entry, short or long syntax."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source")), str(v.get("target")), bool(v.get("read_only"))))
        else:
            src, target, *mode = str(v).split(":")
            out.append((src, target, "ro" in (mode[0].split(",") if mode else [])))
    return out


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


# --- the file -----------------------------------------------------------------------------------------------

def test_image_is_pgvector_pg15_or_newer(db, init):
    m = re.fullmatch(r"(?:docker\.io/)?pgvector/pgvector:pg(\d+)(?:[-.].*)?", db.get("image", ""))
    assert m, f"image {db.get('image')!r} is not pgvector/pgvector:pgNN"
    assert int(m.group(1)) >= 15
    assert init.get("image") == db["image"], "init should run the server's image: nothing more to pull"


def test_port_bound_to_localhost_only(db, compose):
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
        assert m.group("host") == "${GPT_SQL_PORT:-5432}", "gpt-sql's init records GPT_SQL_PORT as the port"
    for name, service in compose["services"].items():
        assert name == "db" or not service.get("ports"), f"{name} publishes a port"
        assert service.get("network_mode") != "host", f"{name} uses the host's network"


def test_no_password_in_the_repository(db, init, compose):
    env = _environment(db)
    assert "POSTGRES_PASSWORD" not in env, "the password comes from .gpt-sql/password, not from compose"
    assert env.get("POSTGRES_HOST_AUTH_METHOD", "") != "trust"
    pw_file = env.get("POSTGRES_PASSWORD_FILE")
    assert pw_file, "the db service takes no POSTGRES_PASSWORD_FILE"
    state = [t for s, t, ro in _mounts(db) if s.rstrip("/") == "./.gpt-sql"]
    assert state and pw_file == f"{state[0]}/password", f"{pw_file} is not the password in ./.gpt-sql"
    assert all(ro for s, _, ro in _mounts(db) if s.startswith(".")), "the server only reads the project's files"
    for name, service in compose["services"].items():
        assert "POSTGRES_PASSWORD" not in _environment(service), name
    assert not re.search(r"PASSWORD\s*[:=]\s*[\"']?(?!/)\w", COMPOSE.read_text(encoding="utf-8")), \
        "a password (or a default for one) is written in docker-compose.yml"
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert {".gpt-sql/", ".gpt-sql", "/.gpt-sql/", "/.gpt-sql"} & set(ignored), ".gpt-sql/ is not gitignored"


def test_db_waits_for_init(db, init):
    deps = db.get("depends_on")
    assert isinstance(deps, dict) and deps.get("init", {}).get("condition") == "service_completed_successfully", \
        "the server must start only once init has written the password"
    assert init.get("restart", "no") == "no", "init is one-shot"
    assert init.get("network_mode") == "none", "init needs no network"
    assert ("./.gpt-sql", "/project/.gpt-sql", False) in _mounts(init)
    assert (".", "/project", True) in _mounts(init), "init sees the project read-only, but for .gpt-sql"
    assert init.get("working_dir") == "/project"


def test_user_and_db_default_to_gpt(db, init):
    for service in (db, init):
        env = _environment(service)
        assert env.get("POSTGRES_USER") == "${POSTGRES_USER:-gpt}"
        assert env.get("POSTGRES_DB") == "${POSTGRES_DB:-gpt}"
    assert _environment(init).get("GPT_SQL_PORT") == "${GPT_SQL_PORT:-5432}"


def test_healthcheck_uses_pg_isready(db):
    hc = db.get("healthcheck")
    assert isinstance(hc, dict) and not hc.get("disable"), "no healthcheck"
    test = hc.get("test")
    assert "pg_isready" in (" ".join(test) if isinstance(test, list) else str(test))


def test_named_volume_declared_and_used(db, init, compose):
    declared = compose.get("volumes") or {}
    assert declared, "no top-level named volume"
    data = [(s, t) for s, t, _ in _mounts(db) if t in (DATA, "/var/lib/postgresql")]
    assert data, f"no volume for the data directory among {_mounts(db)}"
    for src, _ in data:
        assert src in declared, f"{src!r} is a bind mount or undeclared volume"
    assert (data[0][0], DATA, True) in _mounts(init), "init reads the data volume (read-only) to refuse a lost password"
    assert _environment(init).get("PGDATA") == DATA


def test_server_settings(db):
    s = _settings(db)
    assert "shared_buffers" in s
    shared = _size_bytes(s["shared_buffers"])
    assert shared >= 512 * 1024**2, "GPT-2 124M fp32 weights alone are ~500 MB"
    assert s.get("jit") == "off"
    # a parallel worker per core (GPT_SQL_CORES, since compose cannot count the host's) for SELECT f(col) FROM t
    assert s.get("max_parallel_workers_per_gather") == "${GPT_SQL_CORES:-2}"
    assert s.get("max_parallel_workers") == "${GPT_SQL_CORES:-2}"
    assert "work_mem" in s
    shm = db.get("shm_size")
    assert shm is not None, "shm_size is needed with large shared_buffers"
    assert _size_bytes(shm) >= 1024**3
    from gpt_sql.runner.db import SERVER_GLIBC_TUNABLES

    assert _environment(db).get("GLIBC_TUNABLES") == SERVER_GLIBC_TUNABLES


# --- the init script, run here -------------------------------------------------------------------------------

def _run_init(init: dict, project: Path, pgdata: Path, port: str = "5432") -> subprocess.CompletedProcess:
    """init's command as the container runs it, with compose's $$ escapes undone, in `project` as its /project."""
    assert init.get("entrypoint") == ["/bin/sh", "-c"]
    (script,) = init["command"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GPT_SQL_PORT": port, "POSTGRES_USER": "gpt",
           "POSTGRES_DB": "gpt", "PGDATA": str(pgdata)}
    return subprocess.run(["/bin/sh", "-c", script.replace("$$", "$")], cwd=project, env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.skipif(sys.platform != "linux", reason="the script runs in the Linux container (GNU stat)")
def test_init_script_makes_the_password_once(init, tmp_path):
    project, pgdata = tmp_path / "project", tmp_path / "pgdata"
    (project / ".gpt-sql").mkdir(parents=True)
    pgdata.mkdir()
    r = _run_init(init, project, pgdata, port="6543")
    assert r.returncode == 0, r.stderr
    password = (project / ".gpt-sql" / "password").read_text()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    assert stat.S_IMODE((project / ".gpt-sql" / "password").stat().st_mode) == 0o600
    assert stat.S_IMODE((project / ".gpt-sql").stat().st_mode) == 0o700
    assert (project / ".gpt-sql" / "password").stat().st_uid == project.stat().st_uid
    assert (project / ".gpt-sql" / "server").read_text() == "port=6543\nuser=gpt\ndatabase=gpt\n"
    assert sorted(p.name for p in (project / ".gpt-sql").iterdir()) == ["password", "server"]

    (pgdata / "PG_VERSION").write_text("17\n")  # the server is made: later runs keep its password
    r = _run_init(init, project, pgdata, port="5432")
    assert r.returncode == 0, r.stderr
    assert (project / ".gpt-sql" / "password").read_text() == password
    assert (project / ".gpt-sql" / "server").read_text().startswith("port=5432\n")

    (project / ".gpt-sql" / "password").unlink()  # lost: a new one would not open the existing server
    r = _run_init(init, project, pgdata)
    assert r.returncode == 1 and "docker compose down -v" in r.stderr
    assert not (project / ".gpt-sql" / "password").exists()


# --- finding the compose server ------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A directory where `docker compose up` has run: gpt-sql's compose file and the state init writes."""
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / ".gpt-sql").mkdir()
    (tmp_path / ".gpt-sql" / "password").write_text("s3cretPassw0rd")
    (tmp_path / ".gpt-sql" / "server").write_text("port=6543\nuser=gpt\ndatabase=gpt\n")
    monkeypatch.chdir(tmp_path)
    for var in CHOOSERS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _conninfo(dsn: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}


def test_finds_the_compose_server_of_the_current_directory(project):
    assert _conninfo(resolve_dsn(None)) == {"host": "127.0.0.1", "port": "6543", "user": "gpt", "dbname": "gpt",
                                            "password": "s3cretPassw0rd"}
    assert compose_mod.find().where == "the docker compose server at 127.0.0.1:6543 (./docker-compose.yml)"


def test_what_chooses_a_server_comes_first(project, monkeypatch):
    assert resolve_dsn("postgresql://a@b/c") == "postgresql://a@b/c"
    monkeypatch.setenv("PGHOST", "elsewhere")
    assert resolve_dsn(None) == ""
    monkeypatch.delenv("PGHOST")
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@y/z")
    assert resolve_dsn(None) == "postgresql://x@y/z"
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("GPT_SQL_DATA", str(project / "data"))  # the embedded server's data dir, named
    assert resolve_dsn(None) is None


def test_no_compose_state_means_the_embedded_server(project):
    (project / ".gpt-sql" / "password").unlink()  # the compose file alone: never brought up here
    assert resolve_dsn(None) is None
    (project / ".gpt-sql" / "password").write_text("pw")
    (project / "docker-compose.yml").write_text("services:\n  db:\n    image: postgres\n")  # another project's
    assert resolve_dsn(None) is None


def test_port_without_the_record_of_init(project, monkeypatch):
    (project / ".gpt-sql" / "server").unlink()
    assert compose_mod.find().port == 5432
    (project / ".env").write_text("# local\nGPT_SQL_PORT='15432'\n")
    assert compose_mod.find().port == 15432
    monkeypatch.setenv("GPT_SQL_PORT", "25432")
    assert compose_mod.find().port == 25432


def test_unusable_state_is_one_sentence(project):
    (project / ".gpt-sql" / "password").write_text("\n")
    with pytest.raises(DatabaseError, match=r"password of \./docker-compose\.yml is empty.*docker compose up -d"):
        resolve_dsn(None)
    (project / ".gpt-sql" / "password").write_text("pw")
    (project / ".gpt-sql" / "server").write_text("port=x\n")
    with pytest.raises(DatabaseError, match="not a port number"):
        resolve_dsn(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_env() -> dict[str, str]:
    """The environment of a user who has set nothing: no DSN, no PG* variables, no GPT_SQL_DATA."""
    return {k: v for k, v in os.environ.items() if k not in CHOOSERS + ("PGPORT", "PGUSER", "PGPASSWORD")}


def gpt_sql(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], cwd=cwd, env=_cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_server_down_is_a_one_line_error(project):
    port = _free_port()  # nothing listens there
    (project / ".gpt-sql" / "server").write_text(f"port={port}\nuser=gpt\ndatabase=gpt\n")
    r = gpt_sql("models", cwd=project, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"gpt-sql: error: the docker compose server at 127.0.0.1:{port} "
                               f"(./docker-compose.yml) does not answer")
    assert "docker compose up -d" in r.stderr and "--dsn" in r.stderr
    assert "s3cretPassw0rd" not in r.stderr


# --- the real stack ------------------------------------------------------------------------------------------

LIVE_TIMEOUT_S = 900  # pulls nothing (the image must be local); the first start initialises a volume
TINY = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=3)


def _image() -> str:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["db"]["image"]


def _compose_command() -> list[str] | None:
    """`docker compose` (v2, the one the docs name), else the standalone `docker-compose` (v1)."""
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
            return ["docker", "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _live_skip_reason() -> str | None:
    if not shutil.which("docker"):
        return "no docker command"
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
            return "no Docker daemon answers (`docker info` failed)"
        if subprocess.run(["docker", "image", "inspect", _image()], capture_output=True, timeout=30).returncode:
            return f"the image {_image()} is not in the local image store (pull it, or build a stand-in: " \
                   f"sudo tests/compose_image.sh)"
    except subprocess.TimeoutExpired:
        return "the Docker daemon does not answer in time"
    if _compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


class Stack:
    """One compose project in a directory of its own, every command bounded by the test's deadline."""

    def __init__(self, directory: Path, project: str, deadline: float):
        self.dir, self.project, self.deadline = directory, project, deadline
        self.compose = _compose_command()

    def left(self, at_most: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the live compose test ran past its {LIVE_TIMEOUT_S} s")
        return min(left, at_most)

    def run(self, *args: str, at_most: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("GPT_SQL_PORT", "POSTGRES_USER", "POSTGRES_DB")}
        r = subprocess.run([*self.compose, "-p", self.project, *args], cwd=self.dir, env=env, capture_output=True,
                           text=True, timeout=self.left(at_most))
        assert not check or r.returncode == 0, f"{' '.join(self.compose)} {' '.join(args)}: {r.stderr}"
        return r

    def up(self) -> None:
        if self.compose == ["docker", "compose"]:
            self.run("up", "-d", "--wait")
        else:  # v1 has no --wait
            self.run("up", "-d")
        self.wait_healthy()

    def container(self) -> str:
        ids = self.run("ps", "-q", "db", at_most=60).stdout.split()
        assert len(ids) == 1, f"db containers: {ids}"
        return ids[0]

    def wait_healthy(self) -> None:
        cid = self.container()
        status = ""
        while status != "healthy":
            r = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid], capture_output=True,
                               text=True, timeout=self.left(30))
            status = r.stdout.strip()
            assert status in ("starting", "healthy"), f"db is {status or r.stderr}: {self.run('logs', 'db').stdout}"
            if status != "healthy":
                time.sleep(self.left(1))

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return gpt_sql(*args, cwd=self.dir, timeout=self.left(300))


@pytest.fixture(scope="module")
def live_skip() -> None:
    reason = _live_skip_reason()
    if reason:
        pytest.skip(reason)


def test_live_stack_used_from_its_directory(live_skip, tmp_path):
    from tiny import make_checkpoint
    from gpt_sql.loader.hf_format import write_hf
    from gpt_sql.runner.engine import NumpyEngine, Params

    work = tmp_path / "stack"  # a copy: the repository's own .gpt-sql/ stays untouched
    work.mkdir()
    shutil.copy(COMPOSE, work / "docker-compose.yml")
    port = _free_port()
    (work / ".env").write_text(f"GPT_SQL_PORT={port}\n")  # not 5432: a server of the user's may be there
    ckpt = make_checkpoint(**TINY)
    write_hf(ckpt, tmp_path / "tiny")
    expected = [t.token for t in NumpyEngine(ckpt).generate(Params("Happy New Year!", 8, 1.0, 5, 7))]
    using = f"gpt-sql: using the docker compose server at 127.0.0.1:{port} (./docker-compose.yml)"

    stack = Stack(work, f"gptsqltest{uuid.uuid4().hex[:12]}", time.monotonic() + LIVE_TIMEOUT_S)
    try:
        stack.up()
        password = (work / ".gpt-sql" / "password").read_text()
        assert stat.S_IMODE((work / ".gpt-sql" / "password").stat().st_mode) == 0o600

        r = stack.cli("load", str(tmp_path / "tiny"), "--name", "tiny_compose")
        assert r.returncode == 0, r.stderr
        assert using in r.stderr.splitlines(), r.stderr

        def generate() -> list[int]:
            r = stack.cli("run", "Happy New Year!", "--model", "tiny_compose", "--tokens", "8", "--seed", "7", "--json")
            assert r.returncode == 0, r.stderr
            assert r.stderr.splitlines() == [using]
            return json.loads(r.stdout)["tokens"]

        assert generate() == expected

        published = stack.run("port", "db", "5432", at_most=60).stdout.split()
        assert published == [f"127.0.0.1:{port}"]
        bindings = json.loads(subprocess.run(
            ["docker", "inspect", "-f", "{{json .NetworkSettings.Ports}}", stack.container()],
            capture_output=True, text=True, timeout=stack.left(30)).stdout)
        assert {b["HostIp"] for bs in bindings.values() if bs for b in bs} == {"127.0.0.1"}, bindings

        stack.run("restart")
        stack.wait_healthy()
        assert generate() == expected  # a new connection, the same password and data
        assert (work / ".gpt-sql" / "password").read_text() == password

        stack.run("stop", "db")
        r = stack.cli("models")
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "does not answer" in r.stderr and "docker compose up -d" in r.stderr

        stack.run("down", "-v")  # the whole reset: containers, network and data volume
        assert stack.run("ps", "-q", at_most=60).stdout.split() == []
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"name={stack.project}"],
                                 capture_output=True, text=True, timeout=stack.left(30)).stdout.split()
        assert volumes == []
    finally:
        subprocess.run([*stack.compose, "-p", stack.project, "down", "-v", "--remove-orphans"], cwd=work,
                       capture_output=True, timeout=180)
