"""Whether letting the server run parallel workers costs a single prompt: decode, prefill and a function call under
the declarations and settings before and after issue 33, interleaved on one connection.

    python bench/parallel_settings.py [--model bench_124m] [--rounds 5] [--steps 8]

Each variant is applied to the loaded model (ALTER FUNCTION: volatility, parallel safety, COST, the functions' SET
max_parallel_workers_per_gather) and to the session, then every measurement runs; the variants take turns round by
round, so that a slow spell of the machine falls on all of them:

- before: the model functions VOLATILE PARALLEL UNSAFE COST 100, linear() and raise_error() PARALLEL UNSAFE,
  max_parallel_workers_per_gather = 0 everywhere (the server's setting then);
- unguarded: everything declared PARALLEL SAFE, the functions' COST, max_parallel_workers_per_gather = 2 for the
  session and no setting of the functions' own;
- guarded (what gpt-sql ships): as unguarded, with max_parallel_workers_per_gather = 0 for the generation (the
  runner's session settings, each function's SET); the query sent as psql sends it still sees the server's 2.

Measurements: the prefill of a 10-token prompt and the decode steps after it (median of --steps), the prefill of a
100-token prompt (the runner's streamed query); `SELECT model.perplexity(text)` of a 100-token text (the function's
own plan); a 5-token generation after the 10-token prompt sent as psql sends sql/generate.sql (no cursor, so a
parallel plan is allowed). Prints whether the plans of the query sent as psql sends it differ between the variants,
then the median and the spread of each measurement over the rounds. Leaves the model as gpt-sql declares it
(guarded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from bench import model, prompt_of  # noqa: E402

from gpt_sql.loader.functions import FUNCTIONS, LABELS, function_cost  # noqa: E402
from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner import queries  # noqa: E402
from gpt_sql.runner.db import SESSION_SETTINGS, connect, fit_shared_buffers  # noqa: E402
from gpt_sql.runner.engine import Params, generate_sql, prepare  # noqa: E402
from gpt_sql.runner.models import model_names, read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

VARIANTS = ("before", "unguarded", "guarded")


def signature(args: str) -> sql.Composable:
    """A function's argument types as ALTER FUNCTION names them."""
    return sql.SQL(", ".join(a.split(" DEFAULT ")[0] for a in args.split(", ")))


def apply(conn, schema: str, variant: str, cost: int) -> None:
    """Declare the model's functions as `variant` has them, and set the runner's session settings to match."""
    s = sql.Identifier(schema)
    labels, fcost = ("VOLATILE PARALLEL UNSAFE", 100) if variant == "before" else (LABELS, cost)
    helpers = "PARALLEL UNSAFE" if variant == "before" else "PARALLEL SAFE"
    with conn.transaction():
        for f in FUNCTIONS:
            sig = sql.SQL("{}.{}({})").format(s, sql.Identifier(f.name), signature(f.args))
            conn.execute(sql.SQL("ALTER FUNCTION {} {} COST {}").format(sig, sql.SQL(labels), sql.SQL(str(fcost))))
            conn.execute(sql.SQL("ALTER FUNCTION {} SET max_parallel_workers_per_gather = 0" if variant == "guarded"
                                 else "ALTER FUNCTION {} RESET max_parallel_workers_per_gather").format(sig))
        conn.execute(sql.SQL("ALTER FUNCTION {}.linear(anyarray, text, int, int, text) {}").format(s, sql.SQL(helpers)))
        conn.execute(sql.SQL("ALTER FUNCTION {}.raise_error(text) {}").format(s, sql.SQL(helpers)))
    server = "0" if variant == "before" else "2"
    conn.execute("SELECT set_config('max_parallel_workers_per_gather', %s, false)", (server,))
    SESSION_SETTINGS["max_parallel_workers_per_gather"] = "0" if variant == "guarded" else server


def measure(conn, schema: str, short: str, long: str, steps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t, gaps = time.perf_counter(), []
    for token in generate_sql(conn, schema, Params(short, tokens=steps + 1, top_n=1)):
        now = time.perf_counter()
        gaps.append(now - t)
        t = now
    out["prefill, 10 tokens"], out["decode step after 10"] = gaps[0], statistics.median(gaps[1:])
    t = time.perf_counter()
    list(generate_sql(conn, schema, Params(long, tokens=1, top_n=1)))
    out["prefill, 100 tokens"] = time.perf_counter() - t
    t = time.perf_counter()
    conn.execute(sql.SQL("SELECT {}.perplexity(%s)").format(sql.Identifier(schema)), (long,)).fetchone()
    out["perplexity(), 100 tokens"] = time.perf_counter() - t
    with conn.transaction():  # as psql runs sql/generate.sql: the settings, then the query itself, no cursor
        conn.execute(sql.SQL("SET LOCAL search_path = {}, public").format(sql.Identifier(schema)))
        for k, v in {"gpt.prompt": short, "gpt.tokens": "5", "gpt.top_n": "1", "work_mem": "512MB"}.items():
            conn.execute("SELECT set_config(%s, %s, true)", (k, v))
        t = time.perf_counter()
        conn.execute(queries.query("generate")).fetchall()
        out["psql: 5 tokens after 10"] = time.perf_counter() - t
    return out


def plan(conn, schema: str, kind: str, task: str, prompt: str) -> str:
    """EXPLAIN (COSTS OFF) of a query variant as psql sends it (no cursor, the session's parallel setting)."""
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL search_path = {}, public").format(sql.Identifier(schema)))
        for k, v in {"gpt.prompt": prompt, "gpt.tokens": "5", "gpt.task": task, "work_mem": "512MB"}.items():
            conn.execute("SELECT set_config(%s, %s, true)", (k, v))
        return "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + queries.query(kind)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", default="bench_124m", help="a loaded model, or bench_124m (loaded when missing)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed after the 10-token prompt")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    a = ap.parse_args()
    conn = connect(a.dsn)
    if a.model not in model_names(conn):
        ckpt, _, _ = model(None)
        load(conn, ckpt, a.model, progress=sys.stderr.isatty())
        fit_shared_buffers(conn)
        conn = connect(a.dsn)
    tokenizer = Tokenizer(*read_vocabulary(conn, a.model))
    short, long = prompt_of(tokenizer, 10), prompt_of(tokenizer, 100)
    cost = function_cost(conn.cursor(), a.model)
    results: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    try:
        plans = {}
        for variant in VARIANTS:
            apply(conn, a.model, variant, cost)
            plans[variant] = [plan(conn, a.model, kind, task, long) for kind, task in
                              (("generate", ""), ("perplexity", "score"), ("embed", "embed"))]
        same = all(plans[v] == plans["before"] for v in VARIANTS)
        gather = any("Gather" in p for v in VARIANTS for p in plans[v])
        print(f"the query's plans as psql sends it (generate, perplexity, embed): {'' if same else 'NOT '}the same"
              f" under every variant; {'a' if gather else 'no'} Gather in any\n")
        apply(conn, a.model, "guarded", cost)
        measure(conn, a.model, short, prompt_of(tokenizer, 20), 2)  # the caches warm
        for r in range(a.rounds):
            for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                apply(conn, a.model, variant, cost)
                for name, s in measure(conn, a.model, short, long, a.steps).items():
                    results[variant].setdefault(name, []).append(s)
                print(f"round {r + 1}, {variant}: " + ", ".join(f"{k} {v[-1]:.3f}"
                                                                 for k, v in results[variant].items()), file=sys.stderr)
    finally:
        apply(conn, a.model, "guarded", cost)
    names = list(results["before"])
    print(f"median (min-max) of {a.rounds} interleaved rounds, seconds\n")
    print("| measurement | " + " | ".join(VARIANTS) + " |\n|---|" + "---:|" * len(VARIANTS))
    for name in names:
        cells = [f"{statistics.median(results[v][name]):.3f} ({min(results[v][name]):.3f}-{max(results[v][name]):.3f})"
                 for v in VARIANTS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
