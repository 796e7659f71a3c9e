"""A model's SQL functions (generate, complete, next_tokens, tokenize) from users' own queries."""

from __future__ import annotations

import psycopg
import pytest

from gpt_sql.loader.load import load
from gpt_sql.runner.engine import NumpyEngine, Params, generate_sql, next_sql, tokenize_sql
from gpt_sql.runner.grant import grant
from tiny import make_checkpoint

SHAPE = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=11)
PROMPTS = ["Happy New Year!", "I wish you a happy New", "emoji 🙂 and\ttabs", ""]


@pytest.fixture(scope="module")
def fn_model(conn):
    ckpt = make_checkpoint(**SHAPE)
    load(conn, ckpt, "fn_tiny", progress=False)
    return ckpt


@pytest.fixture
def public_path(conn):
    """search_path = public on the session's shared connection for one test, then back to the default."""
    conn.execute("SET search_path = public")
    yield
    conn.execute("RESET search_path")


@pytest.mark.parametrize("top_n, temperature, seed", [(1, 1.0, 0), (5, 0.8, 3), (40, 2.0, 9)])
def test_generate_and_complete_equal_the_cli_path(conn, fn_model, public_path, top_n, temperature, seed):
    # public_path: the functions find their model whatever the caller's path is
    for prompt in PROMPTS:
        p = Params(prompt, tokens=7, temperature=temperature, top_n=top_n, seed=seed)
        want = list(generate_sql(conn, "fn_tiny", p))
        rows = conn.execute("SELECT step, token, text, bytes, prob FROM fn_tiny.generate(%s, %s, %s, %s, %s)",
                            (prompt, 7, temperature, top_n, seed)).fetchall()
        assert [(r[0], r[1], bytes(r[3])) for r in rows] == [(t.step, t.token, t.bytes) for t in want]
        assert [r[2] for r in rows] == [t.bytes.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
                                        for t in want]
        assert [r[4] for r in rows] == pytest.approx([t.prob for t in want], rel=1e-12)
        (text,) = conn.execute("SELECT fn_tiny.complete(%s, 7, %s, %s, seed => %s)",
                               (prompt, temperature, top_n, seed)).fetchone()
        assert text == b"".join(t.bytes for t in want).decode("utf-8", errors="replace").replace("\x00", "\ufffd")
        eng = NumpyEngine(fn_model)
        assert [r[1] for r in rows] == [t.token for t in eng.generate(p)]


def test_next_tokens_and_tokenize(conn, fn_model):
    for prompt in PROMPTS:
        want = next_sql(conn, "fn_tiny", prompt, 4, 1.5)
        rows = conn.execute("SELECT token, text, bytes, prob FROM fn_tiny.next_tokens(%s, 4, 1.5)", (prompt,)).fetchall()
        assert [(r[0], bytes(r[2]), r[3]) for r in rows] == [(t.token, t.bytes, t.prob) for t in want]
        (ids,) = conn.execute("SELECT fn_tiny.tokenize(%s)", (prompt,)).fetchone()
        assert ids == [t for t, _ in tokenize_sql(conn, "fn_tiny", prompt)] == NumpyEngine(fn_model).tokenizer.encode(prompt)


def test_lateral_over_a_table_of_prompts(conn, fn_model):
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE articles (id int, title text) ON COMMIT DROP")
        conn.execute("INSERT INTO articles VALUES (1, 'Happy New Year!'), (2, 'I wish you'), (3, 'x')")
        rows = conn.execute("SELECT a.id, g.step, g.token FROM articles a"
                            " CROSS JOIN LATERAL fn_tiny.generate(a.title, 4, seed => a.id) g"
                            " ORDER BY a.id, g.step").fetchall()
        completions = dict(conn.execute("SELECT id, fn_tiny.complete(title, 4, seed => id) FROM articles").fetchall())
    eng = NumpyEngine(fn_model)
    for i, title in ((1, "Happy New Year!"), (2, "I wish you"), (3, "x")):
        tokens = [t.token for t in eng.generate(Params(title, tokens=4, seed=i))]
        assert [r[2] for r in rows if r[0] == i] == tokens
        assert completions[i] == eng.tokenizer.decode(tokens)


def test_bad_arguments_are_one_line_errors(conn, fn_model):
    for call, message in [("fn_tiny.complete('hi', 0)", "tokens must be at least 1"),
                          ("fn_tiny.complete('hi', 3, -1)", "temperature must be a positive number"),
                          ("fn_tiny.next_tokens('hi', 0)", "top_n must be between 1 and"),
                          ("fn_tiny.complete(repeat('a ', 200), 3)", "together at most n_ctx")]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            conn.execute(f"SELECT {call}")


def test_least_privilege_role_and_reload(conn, dsn, fn_model):
    conn.execute("DROP ROLE IF EXISTS fn_reader")
    grant(conn, "fn_reader", ["fn_tiny"], create=True, login=True)
    want = [t.token for t in NumpyEngine(fn_model).generate(Params("Happy New Year!", tokens=5, seed=2))]
    load(conn, fn_model, "fn_tiny", progress=False)  # a reload rebuilds the schema; grants and functions survive
    with psycopg.connect(dsn, user="fn_reader", autocommit=True) as reader:
        rows = reader.execute("SELECT token FROM fn_tiny.generate('Happy New Year!', 5, seed => 2)").fetchall()
        assert [r[0] for r in rows] == want
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("CREATE FUNCTION fn_tiny.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'")
