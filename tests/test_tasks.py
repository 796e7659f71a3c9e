"""What in-database users ask of a GPT-2 beside free text, each against its NumPy twin: nucleus sampling (top_p),
log-probabilities of the alternatives, stop strings, scoring and perplexity, embeddings, classification."""

from __future__ import annotations

import math

import numpy as np
import psycopg
import pytest

from gpt_sql.runner.engine import (Batch, GenerationError, NumpyEngine, Params, classify_sql, embed_sql,
                                   generate_batch_sql, generate_sql, score_sql)

SHAPE = dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=2)
PROMPTS = ["Happy New Year!", "I wish you a happy New", "x", ""]
TOL = 1e-5


@pytest.fixture(scope="module")
def model(load_tiny):
    return load_tiny("task_tiny", **SHAPE)


def same(got: list, want: list, temperature: float = 1.0) -> None:
    """Tokens, steps and bytes equal; probabilities and log-probabilities within TOL (log-probabilities are logits /
    temperature, so their fp32 noise grows as the temperature falls: compared in logit units)."""
    assert [(t.step, t.token, t.bytes) for t in got] == [(t.step, t.token, t.bytes) for t in want]
    np.testing.assert_allclose([t.prob for t in got], [t.prob for t in want], rtol=TOL, atol=1e-300)
    for g, w in zip(got, want):
        assert (g.top is None) == (w.top is None)
        if g.top is not None:
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
            np.testing.assert_allclose([lp * temperature for _, lp in g.top], [lp * temperature for _, lp in w.top],
                                       rtol=TOL, atol=TOL)


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95, 1.0])
def test_top_p_matches_numpy(conn, model, top_p):
    """Nucleus sampling after top_n: the fewest candidates whose probability reaches top_p, the same draw."""
    eng = NumpyEngine(model)
    for prompt in PROMPTS:
        for seed in range(3):
            p = Params(prompt, tokens=12, temperature=1.5, top_n=20, seed=seed, top_p=top_p)
            same(list(generate_sql(conn, "task_tiny", p)), list(eng.generate(p)))


def test_top_p_narrows_the_choice(conn, model):
    """A small top_p keeps only the likeliest candidate: greedy whatever the draw."""
    greedy = [t.token for t in generate_sql(conn, "task_tiny", Params("Happy New Year!", 10, 1.0, 1))]
    for seed in range(3):
        p = Params("Happy New Year!", 10, 1.0, 40, seed, top_p=1e-9)
        assert [t.token for t in generate_sql(conn, "task_tiny", p)] == greedy


@pytest.mark.parametrize("logprobs, top_n", [(1, 5), (3, 1), (8, 5)])
def test_logprobs_list_the_likeliest_tokens(conn, model, logprobs, top_n):
    eng = NumpyEngine(model)
    p = Params("Happy New Year!", tokens=6, temperature=0.9, top_n=top_n, seed=4, logprobs=logprobs)
    got = list(generate_sql(conn, "task_tiny", p))
    same(got, list(eng.generate(p)))
    for t in got:
        assert len(t.top) == logprobs
        assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
        if top_n == 1:  # greedy: the token is the likeliest, and its probability the first's
            assert t.top[0][0] == t.token and math.exp(t.top[0][1]) == pytest.approx(t.prob, rel=1e-12)


def stop_cases(eng: NumpyEngine, prompt: str, seed: int) -> list[tuple[str, ...]]:
    """Stop strings that end the generation of 20 tokens at different places: the second token's first byte (inside a
    token), the end of the third token's bytes and the fourth's start (across two tokens), and a string that never
    comes."""
    ref = list(eng.generate(Params(prompt, 20, 2.0, 40, seed)))
    b = [t.bytes for t in ref]
    text = b"".join(b)
    cases = [("\x00never",)]
    for stop in (b[1][:1], b[2][-1:] + b[3][:1], b[4] + b[5]):
        try:
            s = stop.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if s and text.find(stop) >= 0:
            cases.append((s,))
    cases.append(tuple(c[0] for c in cases[1:]))  # several at once: the first to appear wins
    return cases


@pytest.mark.parametrize("prompt", ["Happy New Year!", "x"])
def test_stop_strings_end_each_generation_where_they_start(conn, model, prompt):
    eng = NumpyEngine(model)
    for stops in stop_cases(eng, prompt, seed=5):
        stops = tuple(s for s in stops if "\x00" not in s) or ("\ufffenever",)
        p = Params(prompt, 20, 2.0, 40, 5, stop=stops)
        got, want = list(generate_sql(conn, "task_tiny", p)), list(eng.generate(p))
        same(got, want)
        text = b"".join(t.bytes for t in got)
        assert not any(s.encode() in text for s in stops)
        full = b"".join(t.bytes for t in eng.generate(Params(prompt, 20, 2.0, 40, 5)))
        assert full.startswith(text)
        if any(s.encode() in full for s in stops):
            assert len(got) < 20 or len(text) < len(full)


def test_stop_in_a_batch_and_in_complete(conn, model):
    """Each prompt of a batch stops on its own; complete() returns the text before the stop string."""
    eng = NumpyEngine(model)
    stop = stop_cases(eng, "Happy New Year!", seed=5)[1]
    b = Batch(["Happy New Year!", "x", ""], tokens=20, temperature=2.0, top_n=40, seeds=[5, 5, 6], stop=stop)
    got: dict[int, list] = {}
    for i, t in generate_batch_sql(conn, "task_tiny", b):
        got.setdefault(i, []).append(t)
    for i in range(1, 4):
        same(got.get(i, []), list(eng.generate(b.params(i))))
    (text,) = conn.execute("SELECT task_tiny.complete('Happy New Year!', 20, 2, 40, 5, stop => %s)",
                           [list(stop)]).fetchone()
    want = b"".join(t.bytes for t in eng.generate(b.params(1)))
    assert text == want.decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["Happy New Year!", "I wish you a happy New Year, and many happy returns.", "x"])
def test_score_and_perplexity_match_numpy(conn, model, text):
    eng = NumpyEngine(model)
    got, want = score_sql(conn, "task_tiny", text), eng.score(text)
    assert [t for t, _ in got] == [t for t, _ in want] == eng.tokenizer.encode(text)
    np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], rtol=TOL, atol=TOL)
    rows = conn.execute("SELECT pos, token, text, logprob FROM task_tiny.score(%s)", [text]).fetchall()
    assert [(r[0], r[1], r[3]) for r in rows] == [(k, t, lp) for k, (t, lp) in enumerate(got)]
    assert "".join(r[2] for r in rows) == text
    (ppl,) = conn.execute("SELECT task_tiny.perplexity(%s)", [text]).fetchone()
    assert ppl == pytest.approx(math.exp(-np.mean([lp for _, lp in want])), rel=TOL)


def test_score_of_an_empty_text_is_nothing(conn, model):
    assert score_sql(conn, "task_tiny", "") == []
    assert conn.execute("SELECT task_tiny.perplexity('')").fetchone() == (None,)


@pytest.mark.parametrize("layer", [None, 0, 2])
def test_embed_matches_numpy(conn, model, layer):
    eng = NumpyEngine(model)
    for text in PROMPTS:
        np.testing.assert_allclose(embed_sql(conn, "task_tiny", text, layer), eng.embed(text, layer), rtol=TOL,
                                   atol=TOL)


def test_embeddings_in_a_pgvector_column_with_an_hnsw_index(conn, model):
    """What users do with them: store them beside their rows, index them, ask for nearest neighbours."""
    titles = ["Happy New Year!", "Happy New Year to you", "The quick brown fox", "SELECT token FROM tokens", "x"]
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE articles (id int, title text, embedding vector) ON COMMIT DROP")
        conn.cursor().executemany("INSERT INTO articles VALUES (%s, %s)", list(enumerate(titles, 1)))
        conn.execute("UPDATE articles SET embedding = task_tiny.embed(title)")
        conn.execute("CREATE INDEX ON articles USING hnsw ((embedding::vector(48)) vector_cosine_ops)")
        conn.execute("SET LOCAL enable_seqscan = off")
        nearest = [r[0] for r in conn.execute(
            "SELECT id FROM articles ORDER BY embedding::vector(48) <=> task_tiny.embed('Happy New Year!') LIMIT 3")]
    eng = NumpyEngine(model)
    vs = np.array([eng.embed(t) for t in titles], dtype=np.float64)
    q = vs[0] / np.linalg.norm(vs[0])
    cosine = 1 - (vs / np.linalg.norm(vs, axis=1, keepdims=True)) @ q
    assert nearest == [int(i) + 1 for i in np.argsort(cosine, kind="stable")[:3]]


@pytest.mark.parametrize("text, choices", [("Happy New", ["Year!", "Day", "x", "Year to all"]),
                                           ("", ["Happy", "SELECT"]),
                                           ("I wish you a happy New", ["Year"])])
def test_classify_matches_numpy(conn, model, text, choices):
    """Each choice's probability after the text, normalised over the choices; the text's keys and values are
    computed once and read by every choice."""
    eng = NumpyEngine(model)
    got, want = classify_sql(conn, "task_tiny", text, choices), eng.classify(text, choices)
    assert [c for c, _ in got] == choices == [c for c, _ in want]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in want], rtol=1e-4, atol=TOL)
    assert sum(p for _, p in got) == pytest.approx(1)
    rows = conn.execute("SELECT choice, prob FROM task_tiny.classify(%s, %s)", [text, choices]).fetchall()
    assert rows == got


@pytest.mark.parametrize("params, message", [
    (Params("hi", top_p=0.0), r"gpt.top_p must be in \(0, 1\]"),
    (Params("hi", top_p=1.5), r"gpt.top_p must be in \(0, 1\]"),
    (Params("hi", logprobs=-1), "gpt.logprobs must be between 0 and"),
    (Params("hi", stop=("x", "")), "stop string 2 is empty"),
])
def test_bad_generation_options_are_one_line_errors(conn, model, params, message):
    with pytest.raises(GenerationError, match=message):
        list(generate_sql(conn, "task_tiny", params))
    with pytest.raises(GenerationError, match=message):
        list(NumpyEngine(model).generate(params))


@pytest.mark.parametrize("call, message", [
    ("embed('hi', 3)", r"gpt.layer must be between 0 and 2 \(the blocks\), got 3"),
    ("embed('hi', -1)", "gpt.layer must be between 0 and 2"),
    ("embed(NULL)", "the prompt is NULL"),
    ("classify('hi', '{}')", "no choices: give at least one"),
    ("classify('hi', NULL)", "no choices: give at least one"),
    ("classify('hi', ARRAY['a', ''])", "choice 2 is empty"),
    ("classify('hi', ARRAY['a', NULL])", "choice 2 is NULL"),
    ("classify(NULL, ARRAY['a'])", "the text is NULL"),
    ("score(repeat('word ', 200))", r"the text is \d+ tokens after <\|endoftext\|>: at most n_ctx = 96 fit"),
    ("classify(repeat('a ', 60), ARRAY[repeat('b ', 60)])", r"the text with choice 1 is \d+ tokens"),
    ("generate('hi', top_p => 0)", r"gpt.top_p must be in \(0, 1\]"),
    ("generate('hi', stop => ARRAY[''])", "stop string 1 is empty"),
    ("generate('hi', logprobs => 100000)", "gpt.logprobs must be between 0 and"),
])
def test_bad_arguments_of_the_functions(conn, model, call, message):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message) as e:
        conn.execute(f"SELECT * FROM task_tiny.{call}").fetchall()
    assert "\n" not in e.value.diag.message_primary


def test_functions_over_a_table(conn, model):
    """The functions as queries over rows: perplexity per comment, the likeliest label per message."""
    eng = NumpyEngine(model)
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE comments (id int, body text) ON COMMIT DROP")
        conn.execute("INSERT INTO comments VALUES (1, 'Happy New Year!'), (2, 'SELECT token FROM tokens')")
        ppl = dict(conn.execute("SELECT id, task_tiny.perplexity(body) FROM comments").fetchall())
        labels = dict(conn.execute(
            "SELECT c.id, (SELECT k.choice FROM task_tiny.classify(c.body, ARRAY['happy', 'SQL']) k"
            "              ORDER BY k.prob DESC LIMIT 1) FROM comments c").fetchall())
    for i, body in ((1, "Happy New Year!"), (2, "SELECT token FROM tokens")):
        assert ppl[i] == pytest.approx(math.exp(-np.mean([lp for _, lp in eng.score(body)])), rel=TOL)
        want = eng.classify(body, ["happy", "SQL"])
        assert labels[i] == max(want, key=lambda c: c[1])[0]


def gpt_sql(*args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                          timeout=300, env=os.environ)


def test_cli_score_embed_classify_and_generation_options(model):
    """The commands a user runs, in SQL and in NumPy: the same figures."""
    import json

    eng = NumpyEngine(model)
    for engine in ("sql", "numpy"):
        extra = ["--model", "task_tiny", "--engine", engine]
        r = gpt_sql("score", "Happy New Year!", "--json", *extra)
        assert r.returncode == 0, r.stderr
        out, want = json.loads(r.stdout), eng.score("Happy New Year!")
        assert out["tokens"] == [t for t, _ in want]
        np.testing.assert_allclose(out["logprobs"], [lp for _, lp in want], rtol=TOL, atol=TOL)
        assert out["perplexity"] == pytest.approx(math.exp(-np.mean([lp for _, lp in want])), rel=TOL)
        r = gpt_sql("embed", "Happy New Year!", "--layer", "1", *extra)
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(json.loads(r.stdout), eng.embed("Happy New Year!", 1), rtol=TOL, atol=TOL)
        r = gpt_sql("classify", "Happy New", "--choices", "Year!", "Day", "--json", *extra)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        for choice, prob in eng.classify("Happy New", ["Year!", "Day"]):
            assert got[choice] == pytest.approx(prob, rel=1e-4, abs=TOL)
        r = gpt_sql("run", "Happy New Year!", "--tokens", "8", "--seed", "3", "--top-p", "0.8", "--top-n", "20",
                    "--stop", "e", "--logprobs", "2", "--json", *extra)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        want = list(eng.generate(Params("Happy New Year!", 8, 1.0, 20, 3, 0.8, ("e",), 2)))
        assert out["tokens"] == [t.token for t in want]
        assert [[a["token"] for a in alts] for alts in out["top_logprobs"]] == [[k for k, _ in t.top] for t in want]


@pytest.mark.parametrize("args, message", [
    (["run", "hi", "--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
    (["run", "hi", "--stop", ""], "a stop string must not be empty"),
    (["run", "hi", "--logprobs", "-1"], "must be at least 0"),
    (["embed", "hi", "--layer", "7"], r"gpt.layer must be between 0 and 2"),
    (["classify", "hi", "--choices", ""], "a choice must not be empty"),
])
def test_cli_bad_options_are_one_line_errors(model, args, message):
    import re

    r = gpt_sql(*args, "--model", "task_tiny")
    assert r.returncode != 0 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert re.search(message, r.stderr), r.stderr


@pytest.mark.parametrize("top_n", [1, 40])
def test_a_low_temperature_is_no_error(conn, model, top_n):
    """At temperature 0.001 most logits / temperature lie thousands below the largest: PostgreSQL's exp raises an error
    where it underflows, NumPy's gives 0, and so must the query (exp0)."""
    eng = NumpyEngine(model)
    for prompt in PROMPTS:
        p = Params(prompt, tokens=8, temperature=0.001, top_n=top_n, seed=1, logprobs=3)
        same(list(generate_sql(conn, "task_tiny", p)), list(eng.generate(p)), p.temperature)


def test_score_with_logits_spread_over_hundreds(conn, load_tiny):
    """A model whose logits lie hundreds apart: the one pass over wte, its terms exp(logit - the token's logit) held
    at most e^80 (a vector's float4), cannot sum them, so the query sums those positions again shifted by their
    largest logit; the log-probabilities are still NumPy's."""
    from tiny import make_checkpoint

    ckpt = make_checkpoint(**SHAPE)
    ckpt.params["wte"] *= 40  # the logits are products with wte: their spread grows with it
    from gpt_sql.loader.load import load

    load(conn, ckpt, "task_wide", progress=False)
    eng = NumpyEngine(ckpt)
    for text in ("Happy New Year!", "SELECT token FROM tokens"):
        ids = eng.tokenizer.encode(text)
        logits = eng.model.logits([eng.eot] + ids, eng.model.new_cache())[:len(ids)]
        assert (logits.max(axis=-1) - logits.min(axis=-1)).max() > 745  # exp(logit - max) underflows
        assert (logits.max(axis=-1) - logits[np.arange(len(ids)), ids]).max() > 600  # terms over e^80: the pass over wte cuts them
        got, want = score_sql(conn, "task_wide", text), eng.score(text)
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], rtol=TOL, atol=1e-3)
