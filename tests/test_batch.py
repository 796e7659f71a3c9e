"""Many prompts in one query: each sequence gets exactly what it gets alone, whatever else is in the batch."""

from __future__ import annotations

from dataclasses import replace

import psycopg
import pytest

from gpt_sql.runner import queries
from gpt_sql.runner.db import SESSION_SETTINGS
from gpt_sql.runner.engine import (Batch, GenerationError, NumpyEngine, Params, generate_batch_sql, generate_sql,
                                   prepare)

SHAPE = dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=2)
# mixed lengths: an empty prompt (<|endoftext|> alone), one token, a sentence, a long one
PROMPTS = ["Happy New Year!", "", "x", "I wish you a happy New Year, and many happy returns of the day. " * 2,
           "don't STOP: it's 2026", "emoji 🙂🎉 and   spaces\t\n"]
SAMPLING = [dict(temperature=1.0, top_n=1), dict(temperature=0.8, top_n=5), dict(temperature=2.0, top_n=40)]


@pytest.fixture(scope="module")
def model(load_tiny):
    return load_tiny("batch_tiny", **SHAPE)


def by_prompt(conn, b: Batch) -> dict[int, list]:
    """The batch's tokens per prompt number, each list in step order (checked)."""
    out: dict[int, list] = {}
    for i, t in generate_batch_sql(conn, "batch_tiny", b):
        out.setdefault(i, []).append(t)
    for tokens in out.values():
        assert [t.step for t in tokens] == list(range(1, len(tokens) + 1))
    return out


def alone(conn, b: Batch, i: int) -> list:
    return list(generate_sql(conn, "batch_tiny", b.params(i)))


@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: f"T{s['temperature']}-n{s['top_n']}")
def test_each_sequence_is_what_it_is_alone(conn, model, sampling):
    """Tokens and probabilities equal, to the bit, those of the same prompt and seed run alone (which the tests of
    test_generate.py compare with NumPy); 20 tokens cross a chunk's end (ceil(sqrt(96)) = 10 steps)."""
    b = Batch(PROMPTS, tokens=20, seeds=[3, 1, 4, 1, 5, 9], **sampling)
    got = by_prompt(conn, b)
    assert sorted(got) == list(range(1, len(PROMPTS) + 1))
    for i in got:
        assert got[i] == alone(conn, b, i), f"prompt {i}"
    eng = NumpyEngine(model)
    assert [t.token for t in got[1]] == [t.token for t in eng.generate(b.params(1))]


def test_the_order_and_company_of_a_prompt_do_not_matter(conn, model):
    b = Batch(PROMPTS, tokens=12, top_n=5, seeds=[7] * len(PROMPTS))
    got = by_prompt(conn, b)
    reverse = by_prompt(conn, replace(b, prompts=PROMPTS[::-1]))
    n = len(PROMPTS)
    assert all(got[i] == reverse[n + 1 - i] for i in got)
    assert by_prompt(conn, replace(b, prompts=PROMPTS[2:3], seeds=[7]))[1] == got[3]


def test_default_seeds_are_zero_for_every_prompt(conn, model):
    b = Batch(PROMPTS[:3], tokens=6, top_n=5)
    got = by_prompt(conn, b)
    assert all(got[i] == list(generate_sql(conn, "batch_tiny", Params(PROMPTS[i - 1], 6, 1.0, 5, 0))) for i in got)


def endoftext_seed(model, prompt: str, tokens: int) -> tuple[int, int]:
    """A seed with which the prompt, sampled over the whole vocabulary at a high temperature, reaches
    <|endoftext|> before its last step; and the step it stops at."""
    eng = NumpyEngine(model)
    eot = model.encoder["<|endoftext|>"]
    for seed in range(300):
        ref = [t.token for t in eng.generate(Params(prompt, tokens, 5.0, model.hparams["n_vocab"], seed))]
        if ref[-1] == eot and len(ref) < tokens:
            return seed, len(ref)
    pytest.fail("no seed reached <|endoftext|>")


@pytest.mark.parametrize("work_mem", ["512MB", "64kB"])
def test_one_sequence_stops_early_at_endoftext(conn, model, monkeypatch, work_mem):
    """A sequence that samples <|endoftext|> ends there, mid-chunk or at a chunk's end; the others go on to their
    last step with the tokens they get alone, in the chunks after it (and in groups, with little work_mem)."""
    monkeypatch.setitem(SESSION_SETTINGS, "work_mem", work_mem)
    seed, stop = endoftext_seed(model, "a", 30)
    b = Batch(["Happy New Year!", "a", "x"], tokens=30, temperature=5.0, top_n=model.hparams["n_vocab"],
              seeds=[seed + 1, seed, seed + 2])
    got = by_prompt(conn, b)
    assert len(got[2]) == stop
    for i in got:
        assert got[i] == alone(conn, b, i), f"prompt {i}"
    assert len(got[1]) == 30 or got[1][-1].token == model.encoder["<|endoftext|>"]


def group_size(conn, b: Batch, work_mem: str) -> int:
    """How many sequences the query generates together for this batch (its chunking CTE)."""
    query = queries.query("generate")
    query = query[:query.index("-- sequences:")].rstrip().rstrip(",") + "\nSELECT group_size FROM chunking"
    with conn.transaction():
        prepare(conn, "batch_tiny", {**b.settings(), "work_mem": work_mem}, None)
        return conn.execute(query).fetchone()[0]


def test_a_batch_larger_than_work_mem_runs_in_groups(conn, model, monkeypatch):
    """With little work_mem the batch is cut into groups, generated one after another: the same tokens, and no
    temporary files."""
    b = Batch(PROMPTS * 2, tokens=12, top_n=5, seeds=list(range(2 * len(PROMPTS))))
    assert group_size(conn, b, "512MB") >= len(b.prompts)
    assert 1 < group_size(conn, b, "1MB") < len(b.prompts)
    whole = by_prompt(conn, b)
    monkeypatch.setitem(SESSION_SETTINGS, "work_mem", "1MB")
    conn.execute("SELECT pg_stat_force_next_flush()")
    before = conn.execute("SELECT temp_files FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]
    assert by_prompt(conn, b) == whole
    conn.execute("SELECT pg_stat_force_next_flush()")
    after = conn.execute("SELECT temp_files FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]
    assert after == before


def test_float16_batch_equals_alone(conn, load_tiny):
    load_tiny("batch_tiny_f16", dtype="float16", **SHAPE)
    b = Batch(PROMPTS[:4], tokens=12, top_n=5, seeds=[1, 2, 3, 4])
    got: dict[int, list] = {}
    for i, t in generate_batch_sql(conn, "batch_tiny_f16", b):
        got.setdefault(i, []).append(t)
    for i in got:
        assert got[i] == list(generate_sql(conn, "batch_tiny_f16", b.params(i)))


@pytest.mark.parametrize("batch, message", [
    (Batch([]), "no prompts: give at least one"),
    (Batch(["hi", "ho"], seeds=[1]), "1 seeds for 2 prompts: give one seed per prompt"),
    (Batch(["hi", "word " * 90], tokens=5), r"prompt 2 is \d+ tokens and 5 new tokens .* at most n_ctx = 96 fit"),
    (Batch(["hi", "a\x00b"]), "prompt 2 contains a NUL character"),
    (Batch(["hi", "ho"], tokens=0), "gpt.tokens must be at least 1"),
])
def test_bad_batches_are_refused_before_anything_is_generated(conn, model, batch, message):
    with pytest.raises(GenerationError, match=message):
        list(generate_batch_sql(conn, "batch_tiny", batch))


@pytest.mark.parametrize("call, message", [
    ("generate('{}'::text[])", "no prompts: give at least one"),
    ("generate(ARRAY['hi', NULL, 'ho'])", "prompt 2 is NULL"),
    ("generate(ARRAY['hi', 'ho'], seeds => ARRAY[1, 2, 3])", "3 seeds for 2 prompts"),
    ("generate(ARRAY['hi', 'ho'], seeds => ARRAY[1, NULL])", "seed 2 is NULL"),
    ("generate(ARRAY['hi', repeat('word ', 90)], 5)", r"prompt 2 is \d+ tokens"),
    ("complete(NULL::text[])", "no prompts: give at least one"),
    ("generate(ARRAY[['a', 'b'], ['c', 'd']])", "one-dimensional"),
])
def test_bad_arguments_of_the_batch_functions(conn, model, call, message):
    """One line naming what is wrong, and no row: the whole call fails before it generates."""
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message) as e:
        conn.execute(f"SELECT * FROM batch_tiny.{call}").fetchall()
    assert "\n" not in e.value.diag.message_primary


def test_batch_functions_over_a_table(conn, model):
    """`generate(array_agg(title))` and `complete(...)` over a table's rows: what each row gets alone."""
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE articles (id int, title text) ON COMMIT DROP")
        conn.execute("INSERT INTO articles VALUES (1, 'Happy New Year!'), (2, 'I wish you'), (3, 'x'), (4, '')")
        rows = conn.execute("SELECT a.id, g.step, g.token, g.prob"
                            " FROM (SELECT array_agg(title ORDER BY id) AS titles, array_agg(id::bigint ORDER BY id) AS ids"
                            "       FROM articles) t,"
                            " LATERAL batch_tiny.generate(t.titles, 5, 0.9, 5, seeds => t.ids) g"
                            " JOIN articles a ON a.id = g.i ORDER BY a.id, g.step").fetchall()
        (completions,) = conn.execute("SELECT batch_tiny.complete(array_agg(title ORDER BY id), 5, 0.9, 5,"
                                      " array_agg(id::bigint ORDER BY id)) FROM articles").fetchone()
        single = conn.execute("SELECT id, batch_tiny.complete(title, 5, 0.9, 5, id) FROM articles ORDER BY id").fetchall()
    for i, title in enumerate(["Happy New Year!", "I wish you", "x", ""], 1):
        want = list(generate_sql(conn, "batch_tiny", Params(title, 5, 0.9, 5, i)))
        assert [(r[1], r[2], r[3]) for r in rows if r[0] == i] == [(t.step, t.token, t.prob) for t in want]
    assert completions == [c for _, c in single]


def gpt_sql(*args: str, input: str | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                          input=input, timeout=300, env=os.environ)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_cli_batch_file_streams_each_completion_as_json(model, tmp_path, jobs):
    """`gpt-sql run --batch FILE [--jobs 2]`: one JSON line per prompt (in any order, numbered by its line), each
    what NumPy generates for it with its seed: the file's, else --seed."""
    import json

    lines = [{"prompt": "Happy New Year!", "seed": 5}, {"prompt": ""}, {"prompt": "x", "seed": 9},
             {"prompt": "don't STOP: it's 2026"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = gpt_sql("run", "--batch", str(path), "--model", "batch_tiny", "--tokens", "6", "--seed", "3",
                "--jobs", jobs)
    assert r.returncode == 0, r.stderr
    out = {d["i"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert sorted(out) == [1, 2, 3, 4]
    eng = NumpyEngine(model)
    for i, x in enumerate(lines, 1):
        seed = x.get("seed", 3)
        want = [t.token for t in eng.generate(Params(x["prompt"], 6, 1.0, 5, seed))]
        assert out[i]["prompt"] == x["prompt"] and out[i]["seed"] == seed and out[i]["tokens"] == want
        assert out[i]["text"] == eng.tokenizer.decode(want)


def test_cli_batch_of_plain_lines_from_stdin(model):
    import json

    r = gpt_sql("run", "--batch", "-", "--model", "batch_tiny", "--tokens", "4", "--seed", "2", "--top-n", "1",
                input="Happy New Year!\n\nI wish you\n")
    assert r.returncode == 0, r.stderr
    out = sorted(map(json.loads, r.stdout.splitlines()), key=lambda d: d["i"])
    assert [d["prompt"] for d in out] == ["Happy New Year!", "I wish you"]  # blank lines are no prompts
    eng = NumpyEngine(model)
    assert [d["tokens"] for d in out] == [[t.token for t in eng.generate(Params(p, 4, 1.0, 1, 2))]
                                          for p in ("Happy New Year!", "I wish you")]


@pytest.mark.parametrize("input, args, message", [
    ('{"prompt": "x"}\nnot json\n', [], "stdin line 2: not JSON"),
    ('{"prompt": "x"}\n{"seed": 1}\n', [], 'stdin line 2: expected an object with a "prompt" string'),
    ('{"prompt": "x", "seed": "one"}\n', [], 'stdin line 1: "seed" must be a whole number'),
    ("\n\n", [], "stdin: no prompts"),
    ("hi\n" + "word " * 90 + "\n", ["--jobs", "2"], r"prompt 2 is \d+ tokens"),
    ("hi\n" + "word " * 90 + "\n", [], r"prompt 2 is \d+ tokens"),
    ("hi\n", ["--json"], "leave out --json"),
])
def test_cli_bad_batches_are_one_line_errors_and_nothing_is_printed(model, input, args, message):
    import re

    r = gpt_sql("run", "--batch", "-", "--model", "batch_tiny", "--tokens", "5", *args, input=input)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and re.search(message, r.stderr), r.stderr


def test_cli_prompt_or_batch(model):
    for args in ([], ["hi", "--batch", "-"], ["hi", "--jobs", "2"]):
        r = gpt_sql("run", *args, "--model", "batch_tiny", input="x\n")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
