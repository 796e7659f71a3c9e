"""The SQL query against the NumPy reference, token by token, across shapes, prompts and sampling settings."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_shared_gpt2
from gpt_sql.runner.engine import GenerationError, NumpyEngine, Params, generate_sql, next_sql, tokenize_sql

SHAPES = {
    "tiny_a": dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=1),
    "tiny_b": dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=2),
    "tiny_c": dict(n_embd=64, n_head=8, n_layer=1, n_ctx=128, seed=3, n_merges=60),
}
PROMPTS = ["Happy New Year!", "I wish you a happy New", "héllo wörld — Москва 東京", "emoji 🙂🎉 and   spaces\t\n",
           "don't STOP: it's 2026", "x"]
SAMPLING = [dict(temperature=1.0, top_n=1, seed=0), dict(temperature=1.0, top_n=5, seed=1),
            dict(temperature=0.7, top_n=10, seed=2), dict(temperature=2.0, top_n=40, seed=3)]


def compare(conn, name, ckpt, params: Params):
    ref = list(NumpyEngine(ckpt).generate(params))
    got = list(generate_sql(conn, name, params))
    assert [t.token for t in got] == [t.token for t in ref], f"{name} {params}"
    assert [t.step for t in got] == list(range(1, len(ref) + 1))
    np.testing.assert_allclose([t.prob for t in got], [t.prob for t in ref], rtol=1e-4, atol=1e-6)
    assert b"".join(t.bytes for t in got) == NumpyEngine(ckpt).tokenizer.decode_bytes([t.token for t in ref])
    return got


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: f"T{s['temperature']}-n{s['top_n']}-s{s['seed']}")
def test_sql_matches_numpy(conn, load_tiny, name, sampling):
    ckpt = load_tiny(name, **SHAPES[name])
    for prompt in PROMPTS:
        compare(conn, name, ckpt, Params(prompt, tokens=12, **sampling))


def test_many_tokens_and_long_prompt(conn, load_tiny):
    ckpt = load_tiny("tiny_b", **SHAPES["tiny_b"])
    compare(conn, "tiny_b", ckpt, Params("The quick brown fox jumps over the lazy dog. " * 3, tokens=30, top_n=3, seed=9))


@needs_shared_gpt2
def test_real_gpt2_tokenizer(conn, load_tiny):
    ckpt = load_tiny("tiny_gpt2vocab", n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=5, real_tokenizer=True)
    assert ckpt.hparams["n_vocab"] == 50257
    for prompt in ["Happy New Year!", "I wish you a happy New", "Ünïcödé 🙂 ok"]:
        compare(conn, "tiny_gpt2vocab", ckpt, Params(prompt, tokens=6, top_n=5, seed=4))
        assert [t for t, _ in tokenize_sql(conn, "tiny_gpt2vocab", prompt)] == NumpyEngine(ckpt).encode(prompt)


def test_per_step_logits_agree(conn, load_tiny):
    """Probabilities of the top candidates (what `next` shows) agree with NumPy's softmax within 1e-5."""
    ckpt = load_tiny("tiny_a", **SHAPES["tiny_a"])
    eng = NumpyEngine(ckpt)
    ids = eng.encode("Happy New Year!")
    logits = eng.model.logits(ids, eng.model.new_cache())[-1].astype(np.float64)
    for temperature in (0.5, 1.0, 3.0):
        p = np.exp(logits / temperature - np.max(logits / temperature))
        p /= p.sum()
        cands = next_sql(conn, "tiny_a", "Happy New Year!", top=8, temperature=temperature)
        assert [c.token for c in cands] == list(np.argsort(-p, kind="stable")[:8])
        np.testing.assert_allclose([c.prob for c in cands], np.sort(p)[::-1][:8], atol=1e-5)


def test_empty_prompt_starts_from_endoftext(conn, load_tiny):
    ckpt = load_tiny("tiny_a", **SHAPES["tiny_a"])
    got = compare(conn, "tiny_a", ckpt, Params("", tokens=5, top_n=3, seed=1))
    assert len(got) >= 1


def test_stops_at_endoftext(conn, load_tiny):
    """With top_n = n_vocab and a high temperature, some seed reaches <|endoftext|>; SQL stops exactly there."""
    ckpt = load_tiny("tiny_a", **SHAPES["tiny_a"])
    eot = ckpt.encoder["<|endoftext|>"]
    eng = NumpyEngine(ckpt)
    for seed in range(200):
        p = Params("a", tokens=40, temperature=5.0, top_n=ckpt.hparams["n_vocab"], seed=seed)
        ref = [t.token for t in eng.generate(p)]
        if eot in ref:
            got = [t.token for t in generate_sql(conn, "tiny_a", p)]
            assert got == ref and got[-1] == eot and len(got) < 40
            return
    pytest.fail("no seed reached <|endoftext|>")


@pytest.mark.parametrize("params, message", [
    (Params("hi", tokens=0), "gpt.tokens must be at least 1"),
    (Params("hi", temperature=0.0), "gpt.temperature must be a positive number"),
    (Params("hi", temperature=float("nan")), "gpt.temperature must be a positive number"),
    (Params("hi", top_n=0), "gpt.top_n must be between 1 and"),
    (Params("hi", top_n=10**6), "gpt.top_n must be between 1 and"),
    (Params("hi", tokens=64), "together at most n_ctx = 64 fit"),
    (Params("word " * 70, tokens=1), "together at most n_ctx = 64 fit"),
])
def test_sql_refuses_bad_parameters(conn, load_tiny, params, message):
    load_tiny("tiny_a", **SHAPES["tiny_a"])
    with pytest.raises(GenerationError, match=message):
        list(generate_sql(conn, "tiny_a", params))


def test_reference_stays_float32(load_tiny):
    """A float64 constant once promoted the whole NumPy forward pass to float64: slower and not what SQL computes."""
    ckpt = load_tiny("tiny_a", **SHAPES["tiny_a"])
    eng = NumpyEngine(ckpt)
    assert eng.model.logits(eng.encode("Happy New Year!"), eng.model.new_cache()).dtype == np.float32


def test_bundled_model_matches_numpy(conn):
    """The model that ships with gpt-sql: SQL and NumPy agree token by token, greedy and sampled."""
    from gpt_sql.loader.checkpoint import read_checkpoint
    from gpt_sql.loader.load import load
    from gpt_sql.runner.firstrun import bundled_path

    if not (bundled_path() / "config.json").exists():
        pytest.skip("the bundled model is not in this checkout")
    ckpt = read_checkpoint(bundled_path())
    load(conn, ckpt, "bundled", progress=False)
    for params in (Params("Happy New Year!", tokens=40, top_n=1),
                   Params("ROMEO:", tokens=40, temperature=0.8, top_n=40, seed=3),
                   Params("First Citizen:\nWe are", tokens=30, temperature=1.0, top_n=5, seed=11)):
        compare(conn, "bundled", ckpt, params)
