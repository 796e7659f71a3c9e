"""The `gpt-sql` command as a user runs it: a subprocess against the session's embedded server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from gpt_sql.runner.engine import NumpyEngine, Params
from gpt_sql.runner.reference import top_logprobs

from conftest import require

TINY = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=1)


def gpt_sql(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny(load_tiny):
    return load_tiny("tiny_a", **TINY)


@pytest.mark.parametrize("command", ["run", "next", "score", "embed", "classify", "tokenize", "sql", "models", "load",
                                     "drop", "download", "server", "inspect", "grant"])
def test_help(command):
    r = gpt_sql(command, "--help")
    assert r.returncode == 0 and "usage: gpt-sql " + command in r.stdout


def test_run_json_matches_numpy(tiny):
    r = gpt_sql("run", "Happy New Year!", "--model", "tiny_a", "--tokens", "8", "--seed", "7", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    eng = NumpyEngine(tiny)
    assert out["prompt_tokens"] == eng.encode("Happy New Year!")
    assert out["tokens"] == [t.token for t in eng.generate(Params("Happy New Year!", 8, 1.0, 5, 7))]
    assert out["text"] == eng.tokenizer.decode(out["tokens"])
    np = gpt_sql("run", "Happy New Year!", "--model", "tiny_a", "--tokens", "8", "--seed", "7", "--json",
                 "--engine", "numpy")
    assert np.returncode == 0, np.stderr
    assert json.loads(np.stdout)["tokens"] == out["tokens"]


def test_run_streams_text(tiny):
    r = gpt_sql("run", "Happy New Year!", "--model", "tiny_a", "--tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    eng = NumpyEngine(tiny)
    tokens = [t.token for t in eng.generate(Params("Happy New Year!", 5, 1.0, 5, 1))]
    assert r.stdout == "Happy New Year!" + eng.tokenizer.decode(tokens) + "\n"


def test_tokenize_and_jsonl(tiny):
    eng = NumpyEngine(tiny)
    texts = ["Happy New Year!", "", "I'M   here\n\n", "🙂 ünï"]
    r = gpt_sql("tokenize", "--jsonl", "--model", "tiny_a", input="".join(json.dumps(t) + "\n" for t in texts))
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == [eng.tokenizer.encode(t) for t in texts]
    r = gpt_sql("tokenize", "Happy", "--model", "tiny_a")
    assert r.returncode == 0 and r.stdout.split()[0] == str(eng.tokenizer.encode("Happy")[0])


def test_next_lists_candidates(tiny):
    r = gpt_sql("next", "I wish you a happy New", "--model", "tiny_a", "--top", "3", "--temperature", "1", "2",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"1.0", "2.0"} and all(len(v) == 3 for v in out.values())
    assert out["2.0"][0]["prob"] < out["1.0"][0]["prob"]  # a higher temperature flattens the distribution
    eng = NumpyEngine(tiny)
    logits = eng.model.logits(eng.encode("I wish you a happy New"), eng.model.new_cache())[-1]
    for temperature, got in out.items():
        want = top_logprobs(logits, float(temperature), 3)
        assert [c["token"] for c in got] == [t for t, _ in want]
        assert [c["text"] for c in got] == [eng.tokenizer.decode([t]) for t, _ in want]
        assert [c["prob"] for c in got] == pytest.approx([math.exp(lp) for _, lp in want], abs=1e-5)


def test_models_and_sql(tiny):
    r = gpt_sql("models", "--json")
    assert r.returncode == 0, r.stderr
    models = {m["name"]: m for m in json.loads(r.stdout)}
    assert models["tiny_a"]["n_params"] == tiny.n_params and models["tiny_a"]["size_bytes"] > 0
    for variant in ("generate", "text", "next", "tokenize"):
        r = gpt_sql("sql", variant)
        assert r.returncode == 0 and r.stdout.lstrip().startswith("--") and "WITH RECURSIVE" in r.stdout


def test_models_marks_a_model_in_an_older_layout(load_tiny, conn):
    """A model whose weights are still the UNION ALL view of gpt-sql before 252f6e6 (rebuilt here from a current
    load: the partitions detached, the view over them) still generates, the same tokens, and `models` marks it."""
    tiny = load_tiny("tiny_layout", **TINY)
    args = ("run", "Happy New Year!", "--model", "tiny_layout", "--tokens", "4", "--top-n", "1", "--json")
    before = gpt_sql(*args)
    assert before.returncode == 0, before.stderr
    r = gpt_sql("models", "--json")
    assert {m["name"]: m for m in json.loads(r.stdout)}["tiny_layout"]["older_layout"] is False
    with conn.transaction():
        for table in ("attn_c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj"):
            conn.execute(f"ALTER TABLE tiny_layout.weights DETACH PARTITION tiny_layout.{table}")
        conn.execute("DROP TABLE tiny_layout.weights")
        conn.execute("""CREATE VIEW tiny_layout.weights AS
            SELECT 'c_attn'::text AS matrix, layer, 0 AS chunk, col, w, b FROM tiny_layout.attn_c_attn
            UNION ALL SELECT 'attn_c_proj', layer, 0, col, w, b FROM tiny_layout.attn_c_proj
            UNION ALL SELECT 'c_fc', layer, 0, col, w, b FROM tiny_layout.mlp_c_fc
            UNION ALL SELECT 'mlp_c_proj', layer, chunk, col, w, b FROM tiny_layout.mlp_c_proj""")
    after = gpt_sql(*args)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["tokens"] == json.loads(before.stdout)["tokens"]
    assert json.loads(after.stdout)["tokens"] == [t.token for t in NumpyEngine(tiny).generate(
        Params("Happy New Year!", 4, 1.0, 1, 0))]
    r = gpt_sql("models", "--json")
    assert {m["name"]: m for m in json.loads(r.stdout)}["tiny_layout"]["older_layout"] is True
    r = gpt_sql("models")
    assert r.returncode == 0 and "tiny_layout*" in r.stdout and "load` it again" in r.stdout


def test_load_command(tmp_path, conn):
    from tiny import make_checkpoint
    from gpt_sql.loader.hf_format import write_hf

    ckpt = make_checkpoint(n_embd=16, n_head=2, n_layer=1, n_ctx=32, seed=11)
    write_hf(ckpt, tmp_path / "mini")
    r = gpt_sql("load", str(tmp_path / "mini"), "--name", "cli_mini")
    assert r.returncode == 0, r.stderr
    assert conn.execute("SELECT n_params FROM cli_mini.hparams").fetchone()[0] == ckpt.n_params


@pytest.mark.parametrize("args, message", [
    (["run", "hi", "--model", "no_such_model"], "model 'no_such_model' is not loaded (loaded: "),
    (["run", "hi", "--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
    (["run", "hi", "--temperature", "nan"], "argument --temperature: must be a positive finite number, got nan"),
    (["run", "hi", "--temperature", "-1"], "argument --temperature: must be a positive finite number"),
    (["run", "hi", "--top-n", "0"], "argument --top-n: must be at least 1, got 0"),
    (["run", "a\x01b\udcff"], "argument prompt: the prompt is not valid UTF-8 (it holds a lone surrogate)"),
    (["run", "hi", "--model", "tiny_a", "--top-n", "100000"], ("gpt.top_n must be between 1 and ",
                                                                "(the vocabulary), got 100000")),
    (["run", "hi", "--model", "tiny_a", "--tokens", "1000"],
     "the prompt is 2 tokens and 1000 new tokens were asked for: together at most n_ctx = 64 fit"),
    (["run", "hi", "--dsn", "postgresql://nobody@127.0.0.1:9/none"],
     "cannot connect to postgresql://nobody@127.0.0.1:9/none: connection failed"),
    (["load", "/nonexistent/checkpoint"], "/nonexistent/checkpoint: no such file or directory"),
    (["load", ".", "--name", "Bad-Name"], ".: not a GPT-2 checkpoint (expected hparams.json + model.ckpt.*"),
    (["download", "7B"], "unknown GPT-2 size '7B'; choose one of 124M, 355M, 774M, 1558M"),
])
def test_errors_are_one_line(tiny, args, message):
    """One line on stderr that says what was wrong, with the value or name at fault, and no traceback."""
    r = gpt_sql(*args)
    assert r.returncode != 0
    assert all(part in r.stderr for part in ((message,) if isinstance(message, str) else message)), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_load_openai_format_and_generate(tmp_path):
    """OpenAI's checkpoint layout (TF tensor bundle, hparams.json, encoder.json, vocab.bpe) through `gpt-sql load`
    to a generation equal to NumPy's on the original weights."""
    require("tensorflow", reason="writing a TF checkpoint needs the [tf] extra")
    from tiny import make_checkpoint
    from gpt_sql.loader.openai_format import write_openai

    ckpt = make_checkpoint(n_embd=32, n_head=4, n_layer=2, n_ctx=64, seed=21)
    write_openai(ckpt, tmp_path / "124M-like")
    r = gpt_sql("load", str(tmp_path / "124M-like"), "--name", "cli_openai")
    assert r.returncode == 0, r.stderr
    r = gpt_sql("run", "Happy New Year!", "--model", "cli_openai", "--tokens", "8", "--seed", "5", "--json")
    assert r.returncode == 0, r.stderr
    expected = [t.token for t in NumpyEngine(ckpt).generate(Params("Happy New Year!", 8, 1.0, 5, 5))]
    assert json.loads(r.stdout)["tokens"] == expected
