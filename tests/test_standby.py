"""A hot standby made from the embedded binaries serves generations of models loaded on the primary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest

from gpt_sql.loader.hf_format import write_hf
from gpt_sql.loader.load import load
from gpt_sql.runner.engine import NumpyEngine, Params
from gpt_sql.runner.replica import start_standby, stop_standby, wait_for_replay
from test_cli import gpt_sql
from tiny import make_checkpoint

SHAPE = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=21)


@pytest.fixture(scope="module")
def standby(dsn):
    primary_socket = Path(psycopg.conninfo.conninfo_to_dict(dsn)["host"])
    directory = Path(os.environ["GPT_SQL_DATA"]).parent / "standby"
    uri = start_standby(primary_socket, directory)
    yield uri
    stop_standby(directory)


@pytest.fixture(scope="module")
def replicated(conn, standby):
    """A model loaded on the primary after the standby was made: it reaches the standby by replication."""
    ckpt = make_checkpoint(**SHAPE)
    load(conn, ckpt, "rep_tiny", progress=False)
    with psycopg.connect(standby, autocommit=True) as s:
        wait_for_replay(conn, s)
    return ckpt


def test_standby_is_read_only_and_has_the_model(standby, replicated):
    with psycopg.connect(standby, autocommit=True) as s:
        assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        assert s.execute("SELECT n_params FROM rep_tiny.hparams").fetchone()[0] == replicated.n_params
    r = gpt_sql("models", "--json", "--dsn", standby)
    assert r.returncode == 0, r.stderr
    assert "rep_tiny" in {m["name"] for m in json.loads(r.stdout)}


def test_runs_on_the_standby_equal_the_primary(conn, dsn, standby, replicated):
    args = ("run", "Happy New Year!", "--model", "rep_tiny", "--tokens", "8", "--seed", "3", "--json")
    on_primary, on_standby = gpt_sql(*args, "--dsn", dsn), gpt_sql(*args, "--dsn", standby)
    assert on_primary.returncode == 0 and on_standby.returncode == 0, on_standby.stderr
    tokens = json.loads(on_standby.stdout)["tokens"]
    assert tokens == json.loads(on_primary.stdout)["tokens"]
    assert tokens == [t.token for t in NumpyEngine(replicated).generate(Params("Happy New Year!", 8, 1.0, 5, 3))]
    call = "SELECT rep_tiny.complete('Happy New Year!', 8, seed => 3)"
    with psycopg.connect(standby, autocommit=True) as s:
        assert s.execute(call).fetchone() == conn.execute(call).fetchone()


def test_loading_on_the_standby_is_one_line(standby, tmp_path):
    write_hf(make_checkpoint(**SHAPE), tmp_path)
    r = gpt_sql("load", str(tmp_path), "--name", "rep_other", "--dsn", standby)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "read-only" in r.stderr


def test_multi_host_dsn_spreads_connections(dsn, standby, replicated):
    hosts = [psycopg.conninfo.conninfo_to_dict(u)["host"] for u in (dsn, standby)]
    both = f"postgresql://postgres@/postgres?host={','.join(hosts)}&load_balance_hosts=random"
    seen = set()
    for _ in range(40):
        with psycopg.connect(both, autocommit=True) as c:
            seen.add(c.execute("SELECT pg_is_in_recovery()").fetchone()[0])
    assert seen == {False, True}
    r = gpt_sql("run", "Happy New Year!", "--model", "rep_tiny", "--tokens", "4", "--seed", "3", "--json",
                "--dsn", both)
    assert r.returncode == 0, r.stderr
