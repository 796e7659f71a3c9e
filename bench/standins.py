"""What running on pgvector 0.6 would cost: pgvector 0.7's subvector and || on vectors as SQL stand-ins.

    python bench/standins.py [--rounds 3] [--tokenizer DIR]

On a private embedded server (a temp data dir, removed after), GPT-2 124M shapes with random weights: a 10-token
prompt's first token and the decode steps after it, with pgvector's own functions and with SQL stand-ins (created
in the model's schema, which comes first on the query's search_path), interleaved. The tokens must not change.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAND_INS = """
CREATE FUNCTION sb_124m.vector_concat(a vector, b vector) RETURNS vector LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT (a::real[] || b::real[])::vector $$;
CREATE OPERATOR sb_124m.|| (LEFTARG = vector, RIGHTARG = vector, FUNCTION = sb_124m.vector_concat);
CREATE FUNCTION sb_124m.subvector(v vector, start int, count int) RETURNS vector LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT ((v::real[])[start:start + count - 1])::vector $$;
"""
DROP = "DROP OPERATOR sb_124m.|| (vector, vector); DROP FUNCTION sb_124m.vector_concat, sb_124m.subvector"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per variant, interleaved (default 3)")
    ap.add_argument("--steps", type=int, default=11, help="decode steps timed per round (median taken)")
    ap.add_argument("--tokenizer", help="directory of OpenAI's encoder.json and vocab.bpe (default ../shared/gpt2)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gpt-sql-standins-"))
    os.environ["GPT_SQL_DATA"] = str(tmp / "data")  # before gpt_sql.runner.db reads it
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO / "tests"))
    import tiny
    from bench import model, prompt_of, sql_timings
    from gpt_sql.loader.load import load
    from gpt_sql.runner.db import connect, fit_shared_buffers, stop_embedded
    from gpt_sql.runner.tokenizer import Tokenizer

    if a.tokenizer:
        tiny.SHARED_GPT2 = Path(a.tokenizer)
    try:
        ckpt, label, _ = model(None, "124M")
        conn = connect()
        load(conn, ckpt, "sb_124m", progress=False)
        print(fit_shared_buffers(conn) or "shared_buffers already holds the model")  # restarts the server
        conn = connect()
        print(label, "; shared_buffers", conn.execute("SHOW shared_buffers").fetchone()[0])
        prompt = prompt_of(Tokenizer(ckpt.encoder, ckpt.merges), 10)
        sql_timings(conn, "sb_124m", prompt, 3)  # warm the buffers
        firsts: dict[str, list[float]] = {"pgvector": [], "stand-ins": []}
        steps: dict[str, list[float]] = {"pgvector": [], "stand-ins": []}
        tokens: dict[str, list[int]] = {}
        for r in range(a.rounds):
            for variant in ("pgvector", "stand-ins") if r % 2 == 0 else ("stand-ins", "pgvector"):
                conn.execute(STAND_INS if variant == "stand-ins" else "SELECT 1")
                times, ids = sql_timings(conn, "sb_124m", prompt, a.steps + 1)
                if variant == "stand-ins":
                    conn.execute(DROP)
                assert tokens.setdefault(variant, ids) == ids
                firsts[variant].append(times[0])
                steps[variant].append(statistics.median(times[1:]))
                print(f"round {r + 1}: {variant:>9}: first token {times[0]:.3f} s, decode step "
                      f"{steps[variant][-1]:.3f} s (median of {a.steps})", flush=True)
        assert tokens["pgvector"] == tokens["stand-ins"], "the stand-ins changed the tokens"
        for variant in steps:
            print(f"{variant:>9}: first token median {statistics.median(firsts[variant]):.3f} s "
                  f"({min(firsts[variant]):.3f}-{max(firsts[variant]):.3f}), decode step median "
                  f"{statistics.median(steps[variant]):.3f} s ({min(steps[variant]):.3f}-{max(steps[variant]):.3f})")
        conn.close()
    finally:
        stop_embedded()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
