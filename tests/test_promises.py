"""What the README promises on the command line and no other test held it to (issue 36): `--engine numpy` for
`run --batch`, `next` and `tokenize`; the random default seed `--json` shows; a client killed in the middle of a
run; the text `--stop` cuts and the values `--logprobs` gives. (A first run that takes GPT-2 124M from the download
cache: tests/test_first_run.py.)

The CLI runs in-process (`main`) where its output is all that is compared, as a subprocess where a process of its
own matters: a seed drawn per process, a client killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt_sql.runner.cli import main
from gpt_sql.runner.engine import NumpyEngine, Params

MODEL = "prom_tiny"
SHAPE = dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=6)
TOL = 1e-5  # SQL against NumPy, fp32 noise in probabilities and log-probabilities (as tests/test_tasks.py)


@pytest.fixture(scope="module")
def tiny(load_tiny):
    return load_tiny(MODEL, **SHAPE)


def cli(capsys, *args: str) -> str:
    """`gpt-sql ARGS` in this process: its stdout, after checking that it succeeded and said nothing on stderr."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", (args, rc, err)
    return out


def subprocess_cli(*args: str) -> str:
    """`gpt-sql ARGS` as a process of its own: its stdout, after checking that it succeeded."""
    r = subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    return r.stdout


def both_engines(capsys, *args: str) -> tuple[str, str]:
    """The same command's output computed by the query and by the NumPy reference."""
    return cli(capsys, *args, "--model", MODEL), cli(capsys, *args, "--model", MODEL, "--engine", "numpy")


# --- --engine numpy: the same answers as the query -------------------------------------------------------

def test_batch_with_numpy_engine_gives_the_query_s_completions(capsys, tiny, tmp_path):
    """Every completion's tokens, text and seed (its own, or --seed), and its alternatives' log-probabilities."""
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "Happy New Year!", "seed": 3}, {"prompt": "x"}, {"prompt": ""},
        {"prompt": "I wish you a happy New Year, and many happy returns of the day.", "seed": 11}]) + "\n")
    args = ("run", "--batch", str(batch), "--tokens", "12", "--temperature", "1.5", "--top-n", "20", "--seed", "5",
            "--logprobs", "2")
    sql_out, numpy_out = both_engines(capsys, *args)
    got = {engine: sorted((json.loads(line) for line in out.splitlines()), key=lambda c: c["i"])
           for engine, out in (("sql", sql_out), ("numpy", numpy_out))}
    assert [c["i"] for c in got["sql"]] == [c["i"] for c in got["numpy"]] == [1, 2, 3, 4]
    assert [c["seed"] for c in got["numpy"]] == [3, 5, 5, 11]
    eng = NumpyEngine(tiny)
    for s, n in zip(got["sql"], got["numpy"]):
        assert {k: s[k] for k in ("prompt", "tokens", "text", "seed")} == \
            {k: n[k] for k in ("prompt", "tokens", "text", "seed")}
        want = list(eng.generate(Params(n["prompt"], 12, 1.5, 20, n["seed"], logprobs=2)))
        assert s["tokens"] == [t.token for t in want] and s["tokens"]
        for alts_s, alts_n in zip(s["top_logprobs"], n["top_logprobs"], strict=True):
            assert [a["token"] for a in alts_s] == [a["token"] for a in alts_n]
            np.testing.assert_allclose([a["logprob"] for a in alts_s], [a["logprob"] for a in alts_n],
                                       rtol=TOL, atol=TOL)


def test_next_with_numpy_engine_gives_the_query_s_candidates(capsys, tiny):
    """The same candidates, in the same order, with the same probabilities, at each temperature; the text view too."""
    args = ("next", "I wish you a happy New", "--top", "6", "--temperature", "0.5", "1", "2.5")
    sql_out, numpy_out = both_engines(capsys, *args, "--json")
    s, n = json.loads(sql_out), json.loads(numpy_out)
    assert list(s) == list(n) == ["0.5", "1.0", "2.5"]
    eng = NumpyEngine(tiny)
    ids = eng.encode("I wish you a happy New")
    logits = eng.model.logits(ids, eng.model.new_cache())[-1].astype(np.float64)
    for t in s:
        assert [(c["token"], c["text"]) for c in s[t]] == [(c["token"], c["text"]) for c in n[t]]
        assert len(s[t]) == 6
        np.testing.assert_allclose([c["prob"] for c in s[t]], [c["prob"] for c in n[t]], rtol=TOL, atol=TOL)
        p = np.exp(logits / float(t) - np.max(logits / float(t)))
        p /= p.sum()
        assert [c["token"] for c in n[t]] == list(np.argsort(-p, kind="stable")[:6])
        np.testing.assert_allclose([c["prob"] for c in n[t]], np.sort(p)[::-1][:6], rtol=1e-9)
    sql_text, numpy_text = both_engines(capsys, *args)
    assert sql_text.splitlines()[0] == numpy_text.splitlines()[0] == "temperature 0.5:"
    # the rest of the text view but the probabilities: printed to 4 places, whose last fp32 noise may turn
    assert [line.split()[1:] for line in sql_text.splitlines()] == \
        [line.split()[1:] for line in numpy_text.splitlines()]


@pytest.mark.parametrize("text", ["Happy New Year!", "I'M   here\n\n", "🙂 ünï café", " x"])
def test_tokenize_with_numpy_engine_gives_the_query_s_tokens(capsys, tiny, text):
    sql_out, numpy_out = both_engines(capsys, "tokenize", text)
    assert sql_out == numpy_out
    assert [int(line.split()[0]) for line in numpy_out.splitlines()] == NumpyEngine(tiny).tokenizer.encode(text)


def test_tokenize_jsonl_with_numpy_engine_gives_the_query_s_tokens(capsys, monkeypatch, tiny):
    texts = ["Happy New Year!", "", "I'M   here\n\n", "🙂 ünï café", "SELECT token FROM tokens;"]
    lines = "".join(json.dumps(t) + "\n" for t in texts)
    out = {}
    for engine in ("sql", "numpy"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
        out[engine] = cli(capsys, "tokenize", "--jsonl", "--model", MODEL, "--engine", engine)
    assert out["sql"] == out["numpy"]
    assert [json.loads(line) for line in out["numpy"].splitlines()] == [NumpyEngine(tiny).tokenizer.encode(t)
                                                                        for t in texts]
    # text PostgreSQL cannot hold is refused by both, in the same one line
    errors = {}
    for engine in ("sql", "numpy"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps("ok") + "\n" + json.dumps("a\x00b") + "\n"))
        capsys.readouterr()
        assert main(["tokenize", "--jsonl", "--model", MODEL, "--engine", engine]) == 1
        errors[engine] = capsys.readouterr().err
    assert errors["sql"] == errors["numpy"] == "gpt-sql: error: stdin line 2: the prompt contains a NUL character, " \
                                              "which PostgreSQL text cannot hold\n"


# --- the random default seed ------------------------------------------------------------------------------

def test_random_seed_shown_by_json_reproduces_the_run(capsys, tiny):
    """Without --seed each run (each process: a seed fixed at import would repeat) draws its own seed and --json
    shows it; that seed given back reproduces the tokens, in SQL and in NumPy, and is the seed NumPy's reference
    draws with."""
    args = ("run", "Happy New Year!", "--tokens", "10", "--temperature", "1.5", "--top-n", "20", "--model", MODEL,
            "--json")
    first, second = (json.loads(subprocess_cli(*args)) for _ in range(2))
    from_numpy = json.loads(subprocess_cli(*args, "--engine", "numpy"))
    seeds = [first["seed"], second["seed"], from_numpy["seed"]]
    assert all(isinstance(s, int) for s in seeds)
    assert len(set(seeds)) == 3, seeds  # 2**31 seeds: equal ones would be a one in a billion chance
    eng = NumpyEngine(tiny)
    for run in (first, second, from_numpy):
        assert run["tokens"] == [t.token for t in eng.generate(Params("Happy New Year!", 10, 1.5, 20, run["seed"]))]
        for engine in ("sql", "numpy"):
            again = json.loads(cli(capsys, *args, "--seed", str(run["seed"]), "--engine", engine))
            assert again == run, engine
    assert first["tokens"] != second["tokens"] or first["tokens"] != from_numpy["tokens"]  # the seed mattered


# --- a client that disappears mid-run -----------------------------------------------------------------------

BIG = dict(n_embd=256, n_head=4, n_layer=6, n_ctx=512, seed=3)  # a prefill of ~490 tokens takes seconds in SQL


def test_killed_client_leaves_no_backend(conn, load_tiny):
    """kill -9 of `gpt-sql run` while its backend computes a long prefill (~10 s here): the backend notices the
    closed socket within client_connection_check_interval (1 s, runner/db.py) and leaves pg_stat_activity, rather
    than computing on until it next writes a row. The server's log tells the two apart whatever the machine's speed:
    "connection to client lost" alone from the check, after "could not send data to client" from a write. The run's
    backend is found by application_name, which libpq takes from PGAPPNAME."""
    big = load_tiny("prom_big", **BIG)
    eng = NumpyEngine(big)
    prompt = "Happy New Year! "
    while len(eng.encode(prompt + "Happy New Year! ")) < BIG["n_ctx"] - 20:
        prompt += "Happy New Year! "
    tag = "prom-kill-9"
    log = Path(conn.execute("SELECT current_setting('data_directory')").fetchone()[0]) / "log"
    log_start = log.stat().st_size

    def backend() -> tuple | None:
        return conn.execute("SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
                            (tag,)).fetchone()

    p = subprocess.Popen([sys.executable, "-m", "gpt_sql.runner.cli", "run", prompt, "--model", "prom_big",
                          "--tokens", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PGAPPNAME": tag})
    try:
        fetching = None
        end = time.monotonic() + 30
        while time.monotonic() < end and p.poll() is None:
            row = backend()
            if row and row[1] == "active" and row[2].startswith("FETCH"):
                fetching = row
                break
            time.sleep(0.02)
        assert fetching, f"never saw the run's FETCH (exit {p.poll()})"
        time.sleep(0.3)
        still = backend()
        assert still and still[0] == fetching[0] and still[1] == "active", "the prefill ended before the kill"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        killed = time.monotonic()
        while backend() and time.monotonic() - killed < 30:
            time.sleep(0.02)
        secs = time.monotonic() - killed
        assert backend() is None, f"the killed client's backend is still there after {secs:.1f} s"
        print(f"\nbackend {fetching[0]} left pg_stat_activity {secs:.2f} s after its client was killed")
    finally:
        p.kill()
        p.wait()
    with log.open("rb") as f:
        f.seek(log_start)
        lines = [line for line in f.read().decode("utf-8", "replace").splitlines() if f"[{fetching[0]}]" in line]
    assert any("connection to client lost" in line for line in lines), lines
    assert not any("could not send data to client" in line for line in lines), lines


# --- --stop and --logprobs on the command line --------------------------------------------------------------

def generation(eng: NumpyEngine, prompt: str, seed: int) -> tuple[list[int], list[tuple[int, int]], bytes]:
    """20 tokens at temperature 2 (top-n 40) without a stop: the tokens, their byte spans in the text, the text."""
    tokens, spans, text = [], [], b""
    for t in eng.generate(Params(prompt, 20, 2.0, 40, seed)):
        tokens.append(t.token)
        spans.append((len(text), len(text) + len(t.bytes)))
        text += t.bytes
    return tokens, spans, text


def printable(data: bytes) -> bool:
    return data.isascii() and data.decode().isprintable()


def test_stop_cuts_the_text_as_complete_does(capsys, conn, tiny):
    """`run --stop X --json` ends the text just before the first stop string, inside a token or across two, as the
    complete() SQL function does and as NumPy does; with several, the first to appear. The streamed text too."""
    prompt, seed = "Happy New Year!", 5
    tokens, spans, full = generation(NumpyEngine(tiny), prompt, seed)
    # a stop that starts at a token's second byte, and one across a boundary between tokens
    inside = next(a + 1 for a, b in spans[1:] if b - a >= 3 and printable(full[a + 1:a + 3])
                  and full.find(full[a + 1:a + 3]) == a + 1)
    across = next(b - 1 for a, b in spans[2:-1] if printable(full[b - 1:b + 1])
                  and full.find(full[b - 1:b + 1]) == b - 1)
    cases = [(full[inside:inside + 2].decode(),), (full[across:across + 2].decode(),)]
    cases.append((cases[1][0], cases[0][0]))
    for stops in cases:
        cut = min(full.find(s.encode()) for s in stops if s.encode() in full)
        assert cut > 0
        want = full[:cut].decode("utf-8", errors="replace")
        kept = sum(1 for a, _ in spans if a < cut)  # the tokens before the cut and the one it falls in
        args = ["run", prompt, "--tokens", "20", "--temperature", "2", "--top-n", "40", "--seed", str(seed),
                "--model", MODEL]
        for s in stops:
            args += ["--stop", s]
        (complete,) = conn.execute(f"SELECT {MODEL}.complete(%s, 20, 2, 40, %s, stop => %s)",
                                   (prompt, seed, list(stops))).fetchone()
        assert complete == want, stops
        for engine in ("sql", "numpy"):
            out = json.loads(cli(capsys, *args, "--json", "--engine", engine))
            assert (out["text"], out["tokens"]) == (want, tokens[:kept]), (engine, stops)
            assert cli(capsys, *args, "--engine", engine) == prompt + want + "\n"


def test_logprobs_are_generate_s_alternatives(capsys, conn, tiny):
    """`run --logprobs K --json`: each token's K likeliest alternatives, the values the generate() SQL function's
    alternatives hold (the same query: equal to the bit) and NumPy's (within fp32 noise)."""
    prompt, seed, k = "I wish you a happy New", 9, 4
    args = ("run", prompt, "--tokens", "8", "--temperature", "0.8", "--top-n", "10", "--seed", str(seed),
            "--logprobs", str(k), "--json", "--model", MODEL)
    out = json.loads(cli(capsys, *args))
    rows = conn.execute(f"SELECT step, token, prob, alternatives FROM {MODEL}.generate(%s, 8, 0.8, 10, %s, "
                        "logprobs => %s) ORDER BY step", (prompt, seed, k)).fetchall()
    assert [step for step, *_ in rows] == list(range(1, 9))
    assert out["tokens"] == [token for _, token, _, _ in rows]
    # generate()'s alternatives also give each one's text
    assert out["top_logprobs"] == [[{"token": a["token"], "logprob": a["logprob"]} for a in alts]
                                   for *_, alts in rows]
    for (_, token, prob, _), alts in zip(rows, out["top_logprobs"]):
        assert len(alts) == k
        lps = [a["logprob"] for a in alts]
        assert lps == sorted(lps, reverse=True) and lps[0] < 0 and sum(np.exp(lps)) <= 1
        if token in [a["token"] for a in alts]:  # its probability, at the same temperature, is its alternative's
            assert np.exp(next(a["logprob"] for a in alts if a["token"] == token)) == pytest.approx(prob, rel=1e-9)
    numpy = json.loads(cli(capsys, *args, "--engine", "numpy"))
    assert numpy["tokens"] == out["tokens"]
    want = list(NumpyEngine(tiny).generate(Params(prompt, 8, 0.8, 10, seed, logprobs=k)))
    for got_sql, got_numpy, w in zip(out["top_logprobs"], numpy["top_logprobs"], want, strict=True):
        assert [a["token"] for a in got_sql] == [a["token"] for a in got_numpy] == [t for t, _ in w.top]
        assert [a["logprob"] for a in got_numpy] == [lp for _, lp in w.top]
        np.testing.assert_allclose([a["logprob"] for a in got_sql], [lp for _, lp in w.top], rtol=TOL, atol=TOL)
