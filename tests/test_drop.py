"""`gpt-sql drop NAME`: removes a loaded model, refuses anything else with one line, changes nothing then."""

from __future__ import annotations

import json

from gpt_sql.loader.load import load
from test_cli import gpt_sql
from tiny import make_checkpoint


def models() -> set[str]:
    r = gpt_sql("models", "--json")
    assert r.returncode == 0, r.stderr
    return {m["name"] for m in json.loads(r.stdout)}


def test_drop_removes_the_model(conn):
    load(conn, make_checkpoint(n_embd=32, n_head=2, n_layer=1, n_ctx=32, seed=4), "drop_me", progress=False)
    assert "drop_me" in models()
    r = gpt_sql("drop", "drop_me")
    assert r.returncode == 0 and r.stdout.strip() == "dropped drop_me", r.stderr
    assert "drop_me" not in models()
    assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'drop_me'").fetchone()[0] == 0


def test_drop_refuses_what_is_not_a_model(conn):
    conn.execute("CREATE SCHEMA IF NOT EXISTS user_data")
    conn.execute("CREATE TABLE IF NOT EXISTS user_data.t (x int)")
    before = models()
    for name, message in [("public", "not a gpt-sql model"), ("user_data", "not a gpt-sql model"),
                          ("no_such_model", "is not loaded"), ("Bad-Name", "must be lowercase")]:
        r = gpt_sql("drop", name)
        assert r.returncode == 1 and message in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert conn.execute("SELECT count(*) FROM user_data.t").fetchone()[0] == 0  # still there
    assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone()[0] == 1
    assert models() == before


def test_drop_refuses_a_model_objects_outside_it_depend_on(conn):
    """DROP SCHEMA ... CASCADE would also remove a user's view over the model or a default calling its functions;
    drop refuses instead, and changes nothing."""
    load(conn, make_checkpoint(n_embd=32, n_head=2, n_layer=1, n_ctx=32, seed=5), "used_model", progress=False)
    conn.execute("CREATE SCHEMA reports")
    conn.execute("CREATE VIEW reports.shapes AS SELECT n_embd FROM used_model.hparams")
    conn.execute("CREATE VIEW reports.greetings AS SELECT used_model.tokenize('hi') AS ids")
    conn.execute("CREATE TABLE reports.notes (ids int[] DEFAULT used_model.tokenize('note'))")
    r = gpt_sql("drop", "used_model")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for what in ("view reports.shapes", "view reports.greetings", "table reports.notes"):
        assert what in r.stderr, r.stderr
    assert "used_model" in models()
    assert conn.execute("SELECT count(*) FROM reports.shapes").fetchone()[0] == 1
    assert conn.execute("SELECT ids FROM reports.greetings").fetchone()[0] == conn.execute(
        "SELECT used_model.tokenize('hi')").fetchone()[0]
    conn.execute("DROP SCHEMA reports CASCADE")
    r = gpt_sql("drop", "used_model")
    assert r.returncode == 0 and r.stdout.strip() == "dropped used_model", r.stderr
    assert "used_model" not in models()


def test_reload_refuses_to_remove_a_users_view_over_the_model(conn):
    """A reload replaces the model's schema: it refuses, as drop does, rather than drop a user's view with it."""
    import pytest

    from gpt_sql.loader.load import LoadError

    ckpt = make_checkpoint(n_embd=32, n_head=2, n_layer=1, n_ctx=32, seed=6)
    load(conn, ckpt, "reload_used", progress=False)
    conn.execute("CREATE SCHEMA IF NOT EXISTS user_views")
    conn.execute("CREATE OR REPLACE VIEW user_views.sizes AS SELECT n_embd FROM reload_used.hparams")
    with pytest.raises(LoadError, match=r"used by view user_views\.sizes.*reloading the model would remove"):
        load(conn, ckpt, "reload_used", progress=False)
    assert conn.execute("SELECT n_embd FROM user_views.sizes").fetchone()[0] == 32  # the view and the model stay
    conn.execute("DROP VIEW user_views.sizes")
    load(conn, ckpt, "reload_used", progress=False)
