"""Score, embed and classify against a prefill of the same text, on a GPT-2-shaped model.

    python bench/tasks.py [--model bench_124m] [--text-tokens 100] [--classify-tokens 50] [--runs 3]
                          [--query REV_OR_FILE ...]

Each figure is the wall time of one SQL function call from a fresh statement (the session already warm), the
calls interleaved run by run; the prefill is the first row of `generate_sql` for one new token (the runner's
streamed query), the work a prompt costs before its first token. Loads bench_124m like bench/throughput.py when
it is missing. Prints a markdown table with the median and the spread of the runs. With --query (a git revision
or a file, as bench/compare_queries.py takes them; repeatable), the perplexity, embed and classify of each version
of sql/generate.sql too, as temporary functions over the same model, interleaved with the rest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import model  # noqa: E402
from compare_queries import query_text  # noqa: E402
from throughput import prompts_of  # noqa: E402

from psycopg import sql  # noqa: E402

from gpt_sql.loader.functions import FUNCTIONS, function_body  # noqa: E402
from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner.db import connect, fit_shared_buffers  # noqa: E402
from gpt_sql.runner.engine import Params, generate_sql  # noqa: E402
from gpt_sql.runner.models import model_names, read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

CHOICES = [" to all of you", " and many returns", " my lord", " again"]


def timed(run) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", default="bench_124m", help="a loaded model, or bench_124m (loaded when missing)")
    ap.add_argument("--text-tokens", type=int, default=100, help="the scored and embedded text's length")
    ap.add_argument("--classify-tokens", type=int, default=50, help="the classified text's length")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--query", action="append", default=[], metavar="REV_OR_FILE",
                    help="also time the functions of this version of sql/generate.sql (repeatable)")
    a = ap.parse_args()

    conn = connect()
    if a.model not in model_names(conn):
        ckpt, _, _ = model(None)
        load(conn, ckpt, a.model, progress=sys.stderr.isatty())
        fit_shared_buffers(conn)
        conn = connect()
    tokenizer = Tokenizer(*read_vocabulary(conn, a.model))
    text, short = prompts_of(tokenizer, 2, a.classify_tokens, a.text_tokens)[::-1]
    # the scored text with <|endoftext|> before it is one token longer than its prefill: compare like with like
    scored = tokenizer.decode(tokenizer.encode(text)[:a.text_tokens - 1])
    m = sql.Identifier(a.model)

    def call(query: sql.Composable, *args) -> None:
        conn.execute(query, args).fetchall()

    def prefill(prompt: str) -> None:
        next(iter(generate_sql(conn, a.model, Params(prompt, tokens=1, top_n=1))))

    runs = {
        f"prefill, {a.text_tokens} tokens (the first token's time)": lambda: prefill(text),
        f"perplexity({a.text_tokens - 1} tokens after <|endoftext|>)":
            lambda: call(sql.SQL("SELECT {}.perplexity(%s)").format(m), scored),
        f"embed({a.text_tokens} tokens)": lambda: call(sql.SQL("SELECT {}.embed(%s)").format(m), text),
        f"prefill, {a.classify_tokens} tokens": lambda: prefill(short),
        f"classify({a.classify_tokens} tokens, {len(CHOICES)} choices of up to "
        f"{max(len(tokenizer.encode(c)) for c in CHOICES)} tokens)":
            lambda: call(sql.SQL("SELECT * FROM {}.classify(%s, %s)").format(m), short, CHOICES),
    }
    conn.execute("SET check_function_bodies = off")  # the bodies name the model's tables, found by their search_path
    for k, version in enumerate(a.query):
        base = query_text(version)
        for f in FUNCTIONS:
            if f.name not in ("perplexity", "embed", "classify"):
                continue
            name = sql.Identifier(f"{f.name}_{k}")
            conn.execute(sql.SQL("CREATE FUNCTION pg_temp.{}({}) RETURNS {} LANGUAGE sql VOLATILE AS {}").format(
                name, sql.SQL(f.args), sql.SQL(f.returns), sql.Literal(function_body(f, base))))
            # what the model's own function has: its search_path and settings
            for key, value in conn.execute(
                    "SELECT split_part(c, '=', 1), substr(c, strpos(c, '=') + 1) FROM pg_proc p, unnest(p.proconfig) c "
                    "WHERE p.pronamespace = %s::regnamespace AND p.proname = %s", (a.model, f.name)).fetchall():
                conn.execute(sql.SQL("ALTER FUNCTION pg_temp.{} SET {} = {}").format(
                    name, sql.Identifier(key), sql.SQL(value) if key == "search_path" else sql.Literal(value)))
        runs[f"perplexity, {version}"] = \
            lambda k=k: call(sql.SQL("SELECT pg_temp.{}(%s)").format(sql.Identifier(f"perplexity_{k}")), scored)
        runs[f"embed, {version}"] = \
            lambda k=k: call(sql.SQL("SELECT pg_temp.{}(%s)").format(sql.Identifier(f"embed_{k}")), text)
        runs[f"classify, {version}"] = lambda k=k: call(
            sql.SQL("SELECT * FROM pg_temp.{}(%s, %s)").format(sql.Identifier(f"classify_{k}")), short, CHOICES)
    for run in runs.values():  # a session plans each function's query at its first call
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.runs):
        for name, run in runs.items():
            times[name].append(timed(run))
    print(f"# gpt-sql: score, embed, classify against prefill\n\n- model: {a.model}; {a.runs} interleaved runs each\n")
    print("| call | median (s) | runs (s) |\n|---|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
