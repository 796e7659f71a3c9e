"""The SQL tokenizer against the reference tokenizer on the whole corpus (tests/corpus.py): 100% equal ids,
exact round trips, and the same results whatever the database's locale."""

from __future__ import annotations

import collections

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import corpus
from conftest import missing, shared_gpt2_available
from gpt_sql.loader.load import load
from gpt_sql.runner.engine import tokenize_sql
from gpt_sql.runner.tokenizer import Tokenizer
from tiny import make_checkpoint

TINY = dict(n_embd=16, n_head=2, n_layer=1, n_ctx=32, seed=0)


def strings() -> list[tuple[str, str]]:
    """(category, text) for the corpus; NUL cannot be stored in PostgreSQL text, so those strings are refused
    by the CLI (see test_cli) and left out here."""
    return [(cat, s) for cat, ss in corpus.corpus().items() for s in ss if "\x00" not in s]


@pytest.fixture(scope="module")
def vocab_model(conn):
    """The real GPT-2 tokenizer when ../shared/gpt2 is there; else the tests' trained BPE (pre-tokenization,
    which decides most of the corner cases, does not depend on the vocabulary)."""
    ckpt = make_checkpoint(real_tokenizer=shared_gpt2_available(), **TINY)
    load(conn, ckpt, "tok_corpus", progress=False)
    return Tokenizer(ckpt.encoder, ckpt.merges), ckpt


def test_corpus_is_large_and_varied():
    sizes = collections.Counter(cat for cat, _ in strings())
    assert sum(sizes.values()) >= 5000
    assert len(sizes) >= 20 and min(sizes.values()) >= 50


@pytest.fixture(scope="module")
def bundled_model(conn):
    from gpt_sql.loader.checkpoint import read_checkpoint
    from gpt_sql.runner.firstrun import bundled_path

    if not (bundled_path() / "config.json").exists():
        missing(f"the bundled model is not in the package ({bundled_path()})")
    ckpt = read_checkpoint(bundled_path())
    load(conn, ckpt, "tok_bundled", progress=False)
    return Tokenizer(ckpt.encoder, ckpt.merges), ckpt


@pytest.mark.parametrize("which", ["vocab_model", "bundled_model"])
def test_corpus_matches_reference_exactly(conn, request, which):
    """GPT-2's vocabulary (or the tests' BPE), and the bundled model's own 3,000-token BPE."""
    tok, _ = request.getfixturevalue(which)
    schema = {"vocab_model": "tok_corpus", "bundled_model": "tok_bundled"}[which]
    wrong = []
    for cat, text in strings():
        got = tokenize_sql(conn, schema, text)
        ids = [t for t, _ in got]
        if ids != tok.encode(text):
            wrong.append((cat, text))
        elif b"".join(data for _, data in got) != text.encode("utf-8"):  # decode(encode(text)) == text
            wrong.append((cat, "round trip: " + text))
    assert not wrong, f"{len(wrong)} strings differ, e.g. {wrong[:5]}"


@pytest.mark.parametrize("text, pieces", [
    ("   a", ["  ", " a"]),                      # \s+(?!\S) gives back one space
    ("abc123", ["abc", "123"]),
    ("I'M don't", ["I", "'", "M", " don", "'t"]),  # contractions are lower case only
    ("x 's", ["x", " '", "s"]),
    ("\n\na", ["\n", "\n", "a"]),
    ("a  ", ["a", "  "]),
    ("<|endoftext|>", ["<|", "endoftext", "|>"]),  # plain text, not the special token
])
def test_pretokenizer_corner_cases(conn, vocab_model, text, pieces):
    from gpt_sql.runner.tokenizer import pretokenize

    assert pretokenize(text) == pieces
    tok, _ = vocab_model
    assert [t for t, _ in tokenize_sql(conn, "tok_corpus", text)] == tok.encode(text)


# (label, the least server version that has it, CREATE DATABASE options): the locales besides C that the SQL
# tokenizer must not depend on. The libc ones are the OS's (glibc's): .ci/run generates them (localedef).
LOCALES = [("libc C.UTF-8", 0, "LOCALE_PROVIDER libc LOCALE 'C.UTF-8'"),
           ("builtin C.UTF-8", 170000, "LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8' LOCALE 'C'"),
           ("libc en_US.UTF-8", 0, "LOCALE_PROVIDER libc LOCALE 'en_US.UTF-8'"),
           ("libc de_DE.UTF-8", 0, "LOCALE_PROVIDER libc LOCALE 'de_DE.UTF-8'")]


@pytest.mark.parametrize("label, version, options", LOCALES, ids=[label for label, _, _ in LOCALES])
def test_same_tokens_under_other_locales(conn, dsn, vocab_model, label, version, options):
    if conn.execute("SELECT current_setting('server_version_num')::int").fetchone()[0] < version:
        pytest.skip(f"{label} needs PostgreSQL {version // 10000} or later")
    tok, ckpt = vocab_model
    sample = [text for i, (_, text) in enumerate(strings()) if i % 7 == 0]
    db = "tok_" + "".join(c if c.isalnum() else "_" for c in label.lower())
    conn.execute(f"DROP DATABASE IF EXISTS {db}")
    try:
        conn.execute(f"CREATE DATABASE {db} TEMPLATE template0 ENCODING 'UTF8' {options}")
    except psycopg.Error as e:
        if "locale name" not in str(e):
            raise
        name = label.split()[-1]  # e.g. invalid LC_COLLATE locale name: the OS lacks it
        missing(f"the server cannot create a {label} database: {e} "
                f"(on Debian: localedef -i {name.split('.')[0]} -f UTF-8 {name})")
    try:
        with psycopg.connect(make_conninfo(dsn, dbname=db), autocommit=True) as other:
            load(other, ckpt, "tok_corpus", progress=False)
            bad = [t for t in sample if [i for i, _ in tokenize_sql(other, "tok_corpus", t)] != tok.encode(t)]
            assert not bad, f"{label}: {len(bad)} strings differ, e.g. {bad[:3]}"
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
