"""What a server whose shared_buffers cannot hold the model costs (a managed server's, which the user cannot set).

    python bench/shared_buffers.py [--rounds 3] [--small 128MB] [--large 1GB] [--steps 11]

On a private embedded server (a temp data dir, removed after): loads GPT-2 124M shapes with random weights, then
times decode steps after a 10-token prompt with shared_buffers at --large (holds the model) and at --small
(PostgreSQL's default), interleaved, restarting the server for each; each round first runs one generation to warm
the cache. Prints each round's median step and the medians and spreads per setting. The OS page cache holds the
model's files either way (the machine has the memory): the difference is copying pages from it into shared buffers.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting, interleaved (default 3)")
    ap.add_argument("--small", default="128MB", help="shared_buffers below the model's size (default 128MB)")
    ap.add_argument("--large", default="1GB", help="shared_buffers that holds the model (default 1GB)")
    ap.add_argument("--steps", type=int, default=11, help="decode steps timed per round (median taken)")
    ap.add_argument("--tokenizer", help="directory of OpenAI's encoder.json and vocab.bpe (default ../shared/gpt2)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gpt-sql-sb-"))
    os.environ["GPT_SQL_DATA"] = str(tmp / "data")  # before gpt_sql.runner.db reads it
    sys.path.insert(0, str(REPO / "bench"))
    from bench import model, prompt_of, sql_timings
    from gpt_sql.loader.load import load
    from gpt_sql.runner.db import connect, models_bytes, restart_embedded, stop_embedded
    from gpt_sql.runner.tokenizer import Tokenizer

    if a.tokenizer:
        sys.path.insert(0, str(REPO / "tests"))
        import tiny

        tiny.SHARED_GPT2 = Path(a.tokenizer)
    try:
        ckpt, label, _ = model(None, "124M")
        conn = connect()
        load(conn, ckpt, "sb_124m", progress=False)
        size_mb = models_bytes(conn) / 2**20
        print(f"{label}; the model takes {size_mb:,.0f} MB")
        conn.close()
        prompt = prompt_of(Tokenizer(ckpt.encoder, ckpt.merges), 10)
        steps: dict[str, list[float]] = {a.large: [], a.small: []}
        for r in range(a.rounds):
            for setting in (a.large, a.small) if r % 2 == 0 else (a.small, a.large):
                with connect() as c:
                    c.execute(f"ALTER SYSTEM SET shared_buffers = '{setting}'")
                restart_embedded()
                with connect() as c:
                    assert c.execute("SHOW shared_buffers").fetchone()[0] == setting
                    sql_timings(c, "sb_124m", prompt, 3)  # warm: the model's pages into the buffers if they fit
                    times, _ = sql_timings(c, "sb_124m", prompt, a.steps + 1)
                step = statistics.median(times[1:])
                steps[setting].append(step)
                print(f"round {r + 1}: shared_buffers {setting:>6}: decode step {step:.3f} s (median of {a.steps})",
                      flush=True)
        for setting, values in steps.items():
            print(f"shared_buffers {setting:>6}: median {statistics.median(values):.3f} s, "
                  f"range {min(values):.3f}-{max(values):.3f} s over {len(values)} rounds")
    finally:
        stop_embedded()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
