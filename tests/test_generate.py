"""The SQL query against the NumPy reference, token by token, across shapes, prompts and sampling settings."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from conftest import needs_shared_gpt2
from gpt_sql.runner import queries
from gpt_sql.runner.db import SESSION_SETTINGS
from gpt_sql.runner.engine import (GenerationError, NumpyEngine, Params, generate_sql, next_sql, prepare,
                                   tokenize_sql)
from gpt_sql.runner.reference import sample, softmax, uniform

SHAPES = {
    "tiny_a": dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=1),
    "tiny_b": dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=2),
    "tiny_c": dict(n_embd=64, n_head=8, n_layer=1, n_ctx=128, seed=3, n_merges=60),
}
PROMPTS = ["Happy New Year!", "I wish you a happy New", "héllo wörld — Москва 東京", "emoji 🙂🎉 and   spaces\t\n",
           "don't STOP: it's 2026", "x"]
SAMPLING = [dict(temperature=1.0, top_n=1, seed=0), dict(temperature=1.0, top_n=5, seed=1),
            dict(temperature=0.7, top_n=10, seed=2), dict(temperature=2.0, top_n=40, seed=3)]


def compare(conn, name, ckpt, params: Params, rtol: float = 1e-4):
    ref = list(NumpyEngine(ckpt).generate(params))
    got = list(generate_sql(conn, name, params))
    assert [t.token for t in got] == [t.token for t in ref], f"{name} {params}"
    assert [t.step for t in got] == list(range(1, len(ref) + 1))
    np.testing.assert_allclose([t.prob for t in got], [t.prob for t in ref], rtol=rtol, atol=1e-6)
    assert b"".join(t.bytes for t in got) == NumpyEngine(ckpt).tokenizer.decode_bytes([t.token for t in ref])
    return got


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: f"T{s['temperature']}-n{s['top_n']}-s{s['seed']}")
def test_sql_matches_numpy(conn, load_tiny, name, sampling):
    ckpt = load_tiny(name, **SHAPES[name])
    for prompt in PROMPTS:
        compare(conn, name, ckpt, Params(prompt, tokens=12, **sampling))


# fp16: how far SQL's and NumPy's probabilities may be apart. Their fp32 activations differ in the last bits
# (summation orders), and now and then that puts one on the other side of an fp16 rounding step before a product.
# On these tiny random models 1-ulp noise in the fp32 linear outputs moves NumPy's own fp16 probabilities by up to
# 1.8e-3 (relative; 4.5e-6 without the fp16 rounding), and SQL against NumPy measured up to 3.9e-3.
F16_TOL = 1e-2


def close_call(logits: np.ndarray, params: Params, u: float, a: int, b: int) -> bool:
    """Whether tokens a and b are a decision within F16_TOL: neighbours in the top_n order whose logits nearly tie,
    or whose shared cumulative-probability boundary lies within F16_TOL of the draw u."""
    scaled = logits.astype(np.float64) / params.temperature
    order = list(np.lexsort((np.arange(len(scaled)), -scaled))[:params.top_n])
    if a not in order or b not in order or abs(order.index(a) - order.index(b)) != 1:
        return abs(scaled[a] - scaled[b]) < F16_TOL
    e = np.exp(scaled[order] - scaled[order[0]])
    boundary = np.cumsum(e)[min(order.index(a), order.index(b))] / e.sum()
    return abs(scaled[a] - scaled[b]) < F16_TOL or abs(boundary - u) < F16_TOL


def compare_float16(conn, name, ckpt, params: Params) -> int:
    """SQL's generation with fp16 weights, each step checked against NumPy's decision on the same prefix (teacher
    forcing): the same token unless the decision is a close call (see close_call), and the same probability
    within F16_TOL. Returns how many steps were close calls decided the other way."""
    got = list(generate_sql(conn, name, params))
    eng = NumpyEngine(ckpt)
    cache, inputs, others = eng.model.new_cache(), eng.encode(params.prompt), 0
    assert got, f"{name} {params}: no tokens"
    for t in got:
        logits = eng.model.logits(inputs, cache)[-1]
        u = uniform(params.seed, t.step)
        token, _ = sample(logits, params.temperature, params.top_n, u)
        p = softmax(logits.astype(np.float64) / params.temperature)
        assert abs(t.prob - p[t.token]) <= F16_TOL * p[t.token] + 1e-6, f"{name} {params} step {t.step}"
        if t.token != token:
            assert close_call(logits, params, u, t.token, token), f"{name} {params} step {t.step}: {t.token} != {token}"
            others += 1
        inputs = [t.token]
    return others


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: f"T{s['temperature']}-n{s['top_n']}-s{s['seed']}")
def test_sql_matches_numpy_float16(conn, load_tiny, name, sampling):
    """fp16 weights (halfvec): the same query, with NumPy rounding at the same places, takes NumPy's decision at
    every step but close calls."""
    ckpt = load_tiny(f"{name}_f16", dtype="float16", **SHAPES[name])
    others = [compare_float16(conn, f"{name}_f16", ckpt, Params(prompt, tokens=12, **sampling)) for prompt in PROMPTS]
    assert sum(others) <= len(PROMPTS) * 12 // 10, others  # close calls are a few percent of the steps


def test_float16_rounds_like_sql(conn, load_tiny):
    """The NumPy fp16 reference is not the fp32 one: on the same checkpoint the logits differ (so the test above
    compares something), and NumPy without the activation rounding would drift from SQL."""
    ckpt16 = load_tiny("tiny_a_f16", dtype="float16", **SHAPES["tiny_a"])
    eng16 = NumpyEngine(ckpt16)
    ids = eng16.encode("Happy New Year!")
    l16 = eng16.model.logits(ids, eng16.model.new_cache())[-1]
    unrounded = NumpyEngine(replace(ckpt16, dtype="float32"))
    l_unrounded = unrounded.model.logits(ids, unrounded.model.new_cache())[-1]
    assert not np.array_equal(l16, l_unrounded)
    got = {t.token: t.prob for t in next_sql(conn, "tiny_a_f16", "Happy New Year!", 8, 1.0)}
    p16 = np.exp(l16 - l16.max()) / np.exp(l16 - l16.max()).sum()
    for token, prob in got.items():
        assert abs(prob - p16[token]) < F16_TOL * p16[token]


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


@pytest.mark.parametrize("n_embd, dtype, width", [
    (768, "float32", 1536), (768, "float16", 3072), (1024, "float32", 1024), (1024, "float16", 2048),
    (1280, "float32", 1280), (1280, "float16", 2560), (1600, "float32", 1600), (1600, "float16", 3200),
    (32, "float32", 128)], ids=lambda v: str(v))
def test_c_proj_rows_are_as_wide_as_a_page_allows(n_embd, dtype, width):
    """mlp_c_proj's rows hold as many of its 4 * n_embd inputs as fit a page, in even shares (GPT-2's four sizes)."""
    from gpt_sql.loader.load import c_proj_chunk_width

    assert c_proj_chunk_width({"n_embd": n_embd}, dtype) == width


def test_c_proj_in_several_chunks(conn, monkeypatch):
    """Where a row cannot hold all of c_proj's inputs, they are cut into chunks whose partial products the query
    sums: tokens and probabilities stay NumPy's, and the weights read back whole."""
    from gpt_sql.loader import load as loader
    from gpt_sql.runner.models import read_model
    from tiny import make_checkpoint

    monkeypatch.setattr(loader, "MAX_ROW_BYTES", 4 * 32)  # tiny_a's 128 inputs as 4 chunks of 32 floats
    ckpt = make_checkpoint(**SHAPES["tiny_a"])
    loader.load(conn, ckpt, "tiny_chunked", progress=False)
    assert conn.execute("SELECT count(DISTINCT chunk), min(vector_dims(w)), max(vector_dims(w))"
                        " FROM tiny_chunked.mlp_c_proj").fetchone() == (4, 32, 32)
    back = read_model(conn, "tiny_chunked")
    for name in ("h.0.mlp.c_proj.w", "h.1.mlp.c_proj.b"):
        np.testing.assert_array_equal(back.params[name], ckpt.params[name])
    for sampling in SAMPLING[:2]:
        compare(conn, "tiny_chunked", ckpt, Params("Happy New Year!", tokens=8, **sampling))


def chunk_steps(conn, name: str, params: Params, work_mem: str) -> int:
    """How many steps a chunk of generate runs for these parameters (the query's chunking CTE)."""
    query = queries.query("generate")
    query = query[:query.index("-- generate:")].rstrip().rstrip(",") + "\nSELECT chunk_steps FROM chunking"
    with conn.transaction():
        prepare(conn, name, {**params.settings(), "work_mem": work_mem}, None)
        return conn.execute(query).fetchone()[0]


def test_chunks_are_sqrt_of_n_ctx_within_work_mem(conn, load_tiny):
    """A chunk runs ceil(sqrt(n_ctx)) steps (a step copies the tail since the chunk's start, the chunk's end the whole
    cache), fewer where work_mem cannot hold the tails a chunk keeps (L^2 positions of keys and values); nothing
    else changes it, so a prompt's chunks end at the same steps whatever else is generated with it."""
    load_tiny("tiny_b", **SHAPES["tiny_b"])
    params = Params("Happy New Year!", tokens=80)
    n_ctx = SHAPES["tiny_b"]["n_ctx"]
    assert chunk_steps(conn, "tiny_b", params, "512MB") == math.ceil(math.sqrt(n_ctx))
    per_position = 2 * SHAPES["tiny_b"]["n_layer"] * SHAPES["tiny_b"]["n_embd"] * 4
    assert chunk_steps(conn, "tiny_b", params, "64kB") == int(math.sqrt(64 * 1024 / per_position))
    for other in (replace(params, tokens=1), replace(params, prompt="word " * 4, tokens=20)):
        assert chunk_steps(conn, "tiny_b", other, "512MB") == chunk_steps(conn, "tiny_b", params, "512MB")


@pytest.mark.parametrize("sampling", SAMPLING[:3], ids=lambda s: f"T{s['temperature']}-n{s['top_n']}-s{s['seed']}")
@pytest.mark.parametrize("work_mem", ["512MB", "64kB"])
def test_steps_in_several_chunks(conn, load_tiny, monkeypatch, sampling, work_mem):
    """A long generation runs in many chunks (the step after the prompt's ends the first, its cache the prompt's
    keys and values; each later one adds its steps'): tokens, steps and probabilities stay NumPy's across the
    chunks' boundaries, with chunks as long as the positions ask for and as short as work_mem makes them."""
    ckpt = load_tiny("tiny_b", **SHAPES["tiny_b"])
    params = Params("Happy New Year!", tokens=80, **sampling)
    assert 1 < chunk_steps(conn, "tiny_b", params, work_mem) < 80 // 4
    monkeypatch.setitem(SESSION_SETTINGS, "work_mem", work_mem)
    compare(conn, "tiny_b", ckpt, params)


@pytest.mark.parametrize("work_mem", ["512MB", "64kB"])
def test_stops_at_endoftext(conn, load_tiny, monkeypatch, work_mem):
    """With top_n = n_vocab and a high temperature, some seed reaches <|endoftext|>; SQL stops exactly there, in the
    middle of a chunk or at its end."""
    monkeypatch.setitem(SESSION_SETTINGS, "work_mem", work_mem)
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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_helpers_are_inlined(conn, load_tiny, dtype):
    """gelu, exp0, as_weights and linear are SQL functions the planner must inline: a call per weight row or logit
    instead costs a function's executor each time (a STRICT exp0, which cannot be inlined, doubled a decode step).
    EXPLAIN VERBOSE names a function only where it is called. (layer_norm is called: once per position and layer.)"""
    name = "tiny_a" if dtype == "float32" else "tiny_a_f16"
    load_tiny(name, dtype=dtype, **SHAPES["tiny_a"])
    for variant, settings in (("generate", {}), ("score", {"gpt.task": "score"})):
        with conn.transaction():
            prepare(conn, name, {**Params("Happy New Year!", tokens=3).settings(), **settings}, None)
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (VERBOSE) " + queries.query(variant)))
        for helper in ("gelu(", "exp0(", "as_weights(", "linear("):
            assert helper not in plan, f"{helper} is called, not inlined, in the {variant} query ({dtype})"
