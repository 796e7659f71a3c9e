"""A managed server (RDS, Cloud SQL, Azure, Supabase, Neon...): no superuser, pgvector created by the administrator.

On the session's embedded server, a plain role (NOSUPERUSER, NOCREATEROLE, CREATE on the database) runs every
command through the CLI with --dsn, as a user of such a server would.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
from psycopg import sql

from gpt_sql.runner.engine import NumpyEngine, Params
from tiny import make_checkpoint

SHAPE = dict(n_embd=16, n_head=2, n_layer=2, n_ctx=32, seed=9)
PROMPT = "Happy New Year!"
OWNER, READER = "managed_owner", "managed_reader"


def gpt_sql(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                          timeout=300)


def as_role(dsn: str, role: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return psycopg.conninfo.make_conninfo(**{**info, "user": role, "password": None})


@pytest.fixture(scope="module")
def owner(conn, dsn):
    """The plain role a managed server gives its user; pgvector is there already (the embedded server makes it)."""
    assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone() is not None
    for role in (OWNER, READER):  # left by an earlier run on the same data dir
        if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB").format(sql.Identifier(OWNER)))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(READER)))
    conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
        sql.Identifier(conn.info.dbname), sql.Identifier(OWNER)))
    return as_role(dsn, OWNER)


def test_a_plain_role_loads_runs_and_grants(owner, dsn, tmp_path):
    from gpt_sql.loader.hf_format import write_hf

    ckpt = make_checkpoint(**SHAPE)
    write_hf(ckpt, tmp_path / "tiny")
    with psycopg.connect(owner) as c:
        assert c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)

    r = gpt_sql("load", str(tmp_path / "tiny"), "--name", "managed_tiny", "--dsn", owner)
    assert r.returncode == 0, r.stderr
    eng = NumpyEngine(ckpt)
    want = [t.token for t in eng.generate(Params(PROMPT, tokens=5, temperature=1.0, top_n=5, seed=2))]
    r = gpt_sql("run", PROMPT, "--model", "managed_tiny", "--tokens", "5", "--seed", "2", "--json", "--dsn", owner)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == want
    for command in (["score", PROMPT, "--model", "managed_tiny"], ["embed", PROMPT, "--model", "managed_tiny"],
                    ["models"]):
        r = gpt_sql(*command, "--dsn", owner)
        assert r.returncode == 0, (command, r.stderr)
    with psycopg.connect(owner, autocommit=True) as c:
        assert [t for (t,) in c.execute("SELECT token FROM managed_tiny.generate(%s, 5, seed => 2)", (PROMPT,))] \
            == want
        (text,) = c.execute("SELECT managed_tiny.complete(%s, 5, seed => 2)", (PROMPT,)).fetchone()
        assert text == eng.tokenizer.decode(want)
        scores = c.execute("SELECT logprob FROM managed_tiny.score(%s) ORDER BY pos", (PROMPT,)).fetchall()
        assert [s for (s,) in scores] == pytest.approx([lp for _, lp in eng.score(PROMPT)], abs=1e-4)

    r = gpt_sql("grant", READER, "--model", "managed_tiny", "--dsn", owner)
    assert r.returncode == 0, r.stderr
    with psycopg.connect(as_role(dsn, READER), autocommit=True) as c:
        assert [t for (t,) in c.execute("SELECT token FROM managed_tiny.generate(%s, 5, seed => 2)", (PROMPT,))] \
            == want
    r = gpt_sql("run", PROMPT, "--model", "managed_tiny", "--tokens", "5", "--seed", "2", "--json",
                "--dsn", as_role(dsn, READER))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == want

    # a reload by the plain role keeps the reader's grants; then the role drops its model
    r = gpt_sql("load", str(tmp_path / "tiny"), "--name", "managed_tiny", "--dsn", owner)
    assert r.returncode == 0, r.stderr
    with psycopg.connect(as_role(dsn, READER), autocommit=True) as c:
        assert [t for (t,) in c.execute("SELECT token FROM managed_tiny.generate(%s, 5, seed => 2)", (PROMPT,))] \
            == want
    r = gpt_sql("drop", "managed_tiny", "--dsn", owner)
    assert r.returncode == 0, r.stderr


def test_a_role_that_may_not_create_pgvector_is_told_to_ask_an_administrator(conn, owner, tmp_path):
    """In a database without pgvector, a load by a plain role says in one line that an administrator must run
    CREATE EXTENSION vector, and leaves nothing."""
    from gpt_sql.loader.hf_format import write_hf

    write_hf(make_checkpoint(**SHAPE), tmp_path / "tiny")
    conn.execute("DROP DATABASE IF EXISTS managed_novector")
    conn.execute(sql.SQL("CREATE DATABASE managed_novector OWNER {}").format(sql.Identifier(OWNER)))
    try:
        dsn = psycopg.conninfo.make_conninfo(owner, dbname="managed_novector")
        r = gpt_sql("load", str(tmp_path / "tiny"), "--name", "managed_tiny", "--dsn", dsn)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "an administrator must run `CREATE EXTENSION vector`" in r.stderr, r.stderr
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'managed%'").fetchone() == (0,)
            assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone() == (0,)
    finally:
        conn.execute("DROP DATABASE IF EXISTS managed_novector WITH (FORCE)")
