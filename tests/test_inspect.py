"""`gpt-sql inspect`: attention weights and the logit lens from the query's inspect variant, against NumPy."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
from psycopg import sql

from gpt_sql.loader.checkpoint import read_checkpoint
from gpt_sql.loader.load import load
from gpt_sql.runner import cli, queries
from gpt_sql.runner.engine import GenerationError, NumpyEngine, inspect_sql, next_sql
from gpt_sql.runner.firstrun import bundled_path

from conftest import needs_shared_gpt2, require

PROMPTS = ["Happy New Year!", "a", "", "The quick brown fox jumps over the lazy dog. It's 12:30 — time to go!"]
TOL = 1e-4  # the bound for attention weights and lens probabilities (fp32 agrees far closer)


def assert_agrees(sql_result: dict, numpy_result: dict, tol: float = TOL) -> None:
    assert sql_result["tokens"] == numpy_result["tokens"]
    assert sql_result["attention"].shape == numpy_result["attention"].shape
    assert np.abs(sql_result["attention"] - numpy_result["attention"]).max() < tol
    assert (sql_result["lens_tokens"] == numpy_result["lens_tokens"]).all()
    assert np.abs(sql_result["lens_probs"] - numpy_result["lens_probs"]).max() < tol


@pytest.mark.parametrize("shape", [dict(n_embd=32, n_head=2, n_layer=2), dict(n_embd=48, n_head=3, n_layer=3)])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_sql_equals_numpy(conn, load_tiny, shape, prompt):
    name = f"inspect_{shape['n_embd']}"
    ckpt = load_tiny(name, **shape)
    got, want = inspect_sql(conn, name, prompt), NumpyEngine(ckpt).inspect(prompt)
    n_layer, n_head, n = shape["n_layer"], shape["n_head"], len(want["tokens"])
    assert got["attention"].shape == (n_layer, n_head, n, n)
    assert got["lens_tokens"].shape == (n_layer, n)
    assert_agrees(got, want)


@needs_shared_gpt2
def test_real_tokenizer_and_a_longer_prompt(conn, load_tiny):
    ckpt = load_tiny("inspect_gpt2_tok", n_embd=64, n_head=4, n_layer=2, n_ctx=128, real_tokenizer=True)
    prompt = "It was the best of times, it was the worst of times, it was the age of wisdom, " * 3
    got, want = inspect_sql(conn, "inspect_gpt2_tok", prompt), NumpyEngine(ckpt).inspect(prompt)
    assert len(got["tokens"]) > 50
    assert_agrees(got, want)


def test_bundled_model(conn):
    """The model a fresh machine runs: a Hugging Face checkpoint with its own tokenizer."""
    name = "inspect_bundled"
    ckpt = read_checkpoint(bundled_path())
    load(conn, ckpt, name, progress=False)
    prompt = "ROMEO: But soft, what light"
    assert_agrees(inspect_sql(conn, name, prompt), NumpyEngine(ckpt).inspect(prompt))


def test_weights_are_causal_distributions(conn, load_tiny):
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    w = inspect_sql(conn, "inspect_32", "Happy New Year to you all")["attention"]
    assert np.allclose(w.sum(axis=-1), 1, atol=1e-6)
    n = w.shape[-1]
    assert (w[..., np.triu_indices(n, k=1)[0], np.triu_indices(n, k=1)[1]] == 0).all()
    assert (w[..., np.tril_indices(n)[0], np.tril_indices(n)[1]] > 0).all()


def test_last_layer_lens_is_the_next_token(conn, load_tiny):
    """After the last block, the lens is the model's own next-token distribution."""
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    prompt = "Happy New Year"
    lens = inspect_sql(conn, "inspect_32", prompt)
    best = next_sql(conn, "inspect_32", prompt, top=1, temperature=1.0)[0]
    assert lens["lens_tokens"][-1, -1] == best.token
    assert abs(lens["lens_probs"][-1, -1] - best.prob) < 1e-9


def test_float16_model(conn, load_tiny):
    """fp16 weights: SQL and NumPy round activations at the same places; the sums' order still differs, so a
    value that lands on the other side of an fp16 rounding moves the result a little (see README)."""
    ckpt = load_tiny("inspect_f16", dtype="float16", n_embd=32, n_head=2, n_layer=2)
    got, want = inspect_sql(conn, "inspect_f16", "Happy New Year!"), NumpyEngine(ckpt).inspect("Happy New Year!")
    assert_agrees(got, want, tol=1e-2)


def test_sql_function(conn, load_tiny):
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    rows = conn.execute("SELECT kind, layer, head, pos, token, prob, weights FROM inspect_32.inspect(%s)",
                        ["Happy New Year!"]).fetchall()
    want = inspect_sql(conn, "inspect_32", "Happy New Year!")
    assert [r[4] for r in rows if r[0] == "token"] == want["tokens"]
    lens = {(r[1], r[3]): (r[4], r[5]) for r in rows if r[0] == "lens"}
    assert lens[(1, 3)] == (want["lens_tokens"][1, 3], pytest.approx(want["lens_probs"][1, 3], abs=1e-12))
    attention = [r for r in rows if r[0] == "attention"]
    assert len(attention) == 2 * 2 * 4
    assert all(len(r[6]) == 4 and not any(r[6][r[3] + 1:]) for r in attention)  # zeros past the mask


def test_psql_user_must_turn_inspect_on(conn, load_tiny):
    """The variant reads rows that only gpt.inspect = on keeps: without it, an error that says so."""
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="SET gpt.inspect"):
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL search_path = inspect_32, public"))
            conn.execute("SELECT set_config('gpt.prompt', 'Hi', true), set_config('gpt.tokens', '1', true)")
            conn.execute(queries.query("inspect")).fetchall()


def test_a_prompt_that_does_not_fit_is_refused(conn, load_tiny):
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)  # n_ctx 64
    with pytest.raises(GenerationError, match="n_ctx = 64"):
        inspect_sql(conn, "inspect_32", "word " * 80)


def test_cli_json(conn, load_tiny, dsn, capsys):
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    assert cli.main(["inspect", "Happy New Year!", "--model", "inspect_32", "--json", "--dsn", dsn]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"tokens", "attention", "lens"}
    n = len(out["tokens"])
    assert len(out["attention"]) == 2 and len(out["attention"][0]) == 2
    assert len(out["attention"][1][1]) == n and all(len(row) == n for row in out["attention"][1][1])
    assert out["attention"][0][0][0][1:] == [0] * (n - 1)
    assert len(out["lens"]) == 2 and len(out["lens"][0]) == n
    assert set(out["lens"][1][-1]) == {"token", "prob"}


def test_cli_terminal_view_and_numpy_engine(conn, load_tiny, dsn, capsys):
    ckpt = load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    assert cli.main(["inspect", "Happy New Year!", "--model", "inspect_32", "--dsn", dsn]) == 0
    view = capsys.readouterr().out
    n = len(NumpyEngine(ckpt).encode("Happy New Year!"))
    assert view.startswith(f"{n} tokens, 2 layers x 2 heads\n")
    for layer in range(2):  # a row of the logit lens and the most backward-looking head, for each layer
        assert f"after block {layer}" in view and f"layer {layer}: head " in view
    assert cli.main(["inspect", "Happy New Year!", "--model", "inspect_32", "--dsn", dsn, "--engine", "numpy"]) == 0
    assert capsys.readouterr().out == view


def test_cli_png(conn, load_tiny, dsn, tmp_path, capsys):
    require("matplotlib", reason="--png needs matplotlib (the [png] extra)")
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    path = tmp_path / "inside.png"
    assert cli.main(["inspect", "Happy New Year!", "--model", "inspect_32", "--dsn", dsn, "--png", str(path)]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert 200 <= image.shape[0] <= 30000 and 200 <= image.shape[1] <= 30000
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10
    assert [p.name for p in tmp_path.iterdir()] == ["inside.png"]


@pytest.mark.parametrize("args, message", [
    (["inspect", "x" * 2000, "--model", "inspect_32"], "n_ctx"),
    (["inspect", "Hi", "--model", "no_such_model"], "no_such_model"),
    (["inspect", "Hi", "--model", "inspect_32", "--png", "/no/such/dir/x.png"], "no such directory"),
])
def test_cli_errors_are_one_line(conn, load_tiny, dsn, capsys, args, message):
    load_tiny("inspect_32", n_embd=32, n_head=2, n_layer=2)
    assert cli.main(args + ["--dsn", dsn]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("gpt-sql: error:")
