"""Decoding token bytes to text: SQL's decode_utf8 against Python's errors='replace', and the `text` query."""

from __future__ import annotations

import random

import pytest

from gpt_sql.runner import queries
from gpt_sql.runner.engine import NumpyEngine, Params, _rows

TINY = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=1)


def byte_strings() -> list[bytes]:
    rng = random.Random(0)
    utf8_heavy = [0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x99, 0x82, 0x80, 0xBF, 0xED, 0xA0, 0xF4, 0x90, 0xE0]
    cases = [b"", b"abc", "héllo 🙂 東京".encode(), b"\xe2\x82", b"\xe2\x82A", b"\xf0\x28\x8c\x28", b"\xed\xa0\x80",
             b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x85", "🙂".encode()[:3], b"\xef\xbb\xbf"]
    for _ in range(1500):
        pool = range(256) if rng.random() < 0.5 else utf8_heavy
        cases.append(bytes(rng.choice(pool) for _ in range(rng.randint(0, 12))))
    return cases


def test_decode_utf8_matches_python(conn, load_tiny):
    load_tiny("tiny_a", **TINY)
    conn.execute("SET search_path = tiny_a, public")
    try:
        for data in byte_strings():
            got = conn.execute("SELECT decode_utf8(%s)", (data,)).fetchone()[0]
            assert got == data.decode("utf-8", errors="replace").replace("\x00", "\ufffd"), data
    finally:
        conn.execute("RESET search_path")


@pytest.mark.parametrize("seed", range(6))
def test_text_query_equals_streamed_tokens(conn, load_tiny, seed):
    """The `text` variant returns what the token rows decode to, even when bytes are cut mid-character."""
    ckpt = load_tiny("tiny_a", **TINY)
    p = Params("héllo 🙂", tokens=10, temperature=3.0, top_n=200, seed=seed)
    tokens = [t.token for t in NumpyEngine(ckpt).generate(p)]
    ((i, text),) = list(_rows(conn, "tiny_a", "text", p.settings(), stream=False))
    assert i == 1
    assert text == NumpyEngine(ckpt).tokenizer.decode(tokens).replace("\x00", "\ufffd")


def test_every_variant_is_the_pipeline_with_its_own_tail(conn, load_tiny):
    """The variants replace what follows generate.sql's one `-- decode:` line: each must still be one statement that
    PostgreSQL plans against a loaded model, so a CTE renamed or a second marker in generate.sql breaks this."""
    load_tiny("tiny_a", **TINY)
    assert queries.generate_sql().count(queries.TAIL_MARKER) == 1
    conn.execute("SET search_path = tiny_a, public")
    try:
        for kind in ["generate", *queries.kinds()]:
            conn.execute("EXPLAIN " + queries.query(kind))  # parsed and planned, not run; one statement only
    finally:
        conn.execute("RESET search_path")
