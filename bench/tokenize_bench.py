"""Benchmark: the SQL tokenizer on English prompts of 100 to 1,000 tokens (GPT-2's real vocabulary).

    python bench/tokenize_bench.py [--dsn DSN] [--repeat 5]

Prints, per prompt length, the median time of the `tokenize` query (as `gpt-sql tokenize` runs it) and
checks that its ids equal the reference tokenizer's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner.db import connect  # noqa: E402
from gpt_sql.runner.engine import tokenize_sql  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402
from tiny import SHARED, SHARED_GPT2, make_checkpoint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    if not (SHARED_GPT2 / "encoder.json").exists():
        sys.exit("tokenize_bench: needs OpenAI's tokenizer files in ../shared/gpt2")
    ckpt = make_checkpoint(n_embd=16, n_head=2, n_layer=1, n_ctx=2048, real_tokenizer=True)
    tok = Tokenizer(ckpt.encoder, ckpt.merges)
    conn = connect(a.dsn)
    load(conn, ckpt, "bench_tokenizer", progress=False)
    corpus = SHARED / "corpora" / "tinyshakespeare.txt"
    text = corpus.read_text(encoding="utf-8") if corpus.exists() else "Happy New Year to all of you! " * 500
    print("| prompt tokens | characters | SQL tokenize (ms, median) | ms per 100 tokens |")
    print("|---:|---:|---:|---:|")
    for n in (100, 250, 500, 1000):
        ids = tok.encode(text[: n * 6])[:n]
        prompt = tok.decode(ids)
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            got = [i for i, _ in tokenize_sql(conn, "bench_tokenizer", prompt)]
            times.append(time.perf_counter() - t)
        assert got == tok.encode(prompt), "SQL and reference tokenizers disagree"
        ms = statistics.median(times) * 1000
        print(f"| {len(got)} | {len(prompt)} | {ms:.0f} | {ms / len(got) * 100:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
