"""Where the query's time goes, per CTE: EXPLAIN ANALYZE of a prefill and of the decode steps after it.

    python bench/explain_ctes.py [--prompt-tokens 10] [--steps 5] [--batch 1] [--model bench_124m]

Runs the shipped query under EXPLAIN (ANALYZE, FORMAT JSON) with the runner's settings on a loaded model
(bench/bench.py leaves `bench_124m`), greedy, for 1 and for 1 + --steps new tokens, with a prompt of exactly
--prompt-tokens tokens cut from tinyshakespeare (--batch of them generated together). For every CTE it prints the time spent in its plan (actual time x
loops) in the first run (the prefill and one token) and per extra step (the difference over --steps). A CTE's time
includes the CTEs it pulls rows from the first time: its own time is its figure less theirs (c_proj's less
hidden's, hidden's less c_fc's, and so on). Instrumentation adds time to every row, so the totals run above the
streamed timings of bench.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from bench import prompt_of  # noqa: E402

from gpt_sql.runner import queries  # noqa: E402
from gpt_sql.runner.db import connect  # noqa: E402
from gpt_sql.runner.engine import Batch, prepare  # noqa: E402
from gpt_sql.runner.models import read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402


def cte_times(plan: dict) -> dict[str, float]:
    """Milliseconds per CTE name in one EXPLAIN (ANALYZE, FORMAT JSON) plan."""
    times: dict[str, float] = {}

    def walk(node: dict) -> None:
        name = node.get("Subplan Name", "")
        if name.startswith("CTE "):
            times[name[4:]] = times.get(name[4:], 0.0) + node["Actual Total Time"] * node["Actual Loops"]
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return times


def explain(conn: psycopg.Connection, model: str, prompt: str, tokens: int,
            batch: int = 1) -> tuple[float, dict[str, float]]:
    with conn.transaction():
        prepare(conn, model, Batch([prompt] * batch, tokens=tokens, top_n=1).settings(), None)
        plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + queries.query("generate")).fetchone()[0][0]
    return plan["Execution Time"], cte_times(plan)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=10, help="prompt length in tokens (default 10)")
    ap.add_argument("--steps", type=int, default=5, help="extra decode steps to average over (default 5)")
    ap.add_argument("--batch", type=int, default=1, help="prompts generated together (default 1)")
    ap.add_argument("--model", default="bench_124m", help="a loaded model (default bench_124m, from bench/bench.py)")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    a = ap.parse_args()

    conn = connect(a.dsn)
    prompt = prompt_of(Tokenizer(*read_vocabulary(conn, a.model)), a.prompt_tokens)
    first_ms, first = explain(conn, a.model, prompt, 1, a.batch)
    more_ms, more = explain(conn, a.model, prompt, 1 + a.steps, a.batch)
    print(f"{a.batch} x {a.prompt_tokens}-token prompt: prefill and one token {first_ms:.0f} ms, "
          f"then {(more_ms - first_ms) / a.steps:.1f} ms a decode step (instrumented)")
    print(f"{'CTE':16s} {'prefill (ms)':>13s} {'per step (ms)':>14s}")
    for name in sorted(more, key=lambda n: -more[n]):
        step = (more[name] - first.get(name, 0.0)) / a.steps
        if first.get(name, 0.0) >= 0.5 or step >= 0.5:
            print(f"{name:16s} {first.get(name, 0.0):13.1f} {step:14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
