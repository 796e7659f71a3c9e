"""The embedded server's glibc malloc settings side by side: what each costs a short prefill and a decode step, and
what memory a backend keeps after a long prompt's call.

    python bench/glibc_settings.py [--rounds 2] [--long 490] NAME=TUNABLES [NAME=TUNABLES ...]

    e.g. python bench/glibc_settings.py now=glibc.malloc.mmap_threshold=524288 \\
             heap=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296

For each round and each setting in turn (interleaved, so a slow spell of the machine falls on all of them), restarts
the embedded server with GLIBC_TUNABLES=TUNABLES (an empty one: glibc's defaults) and, on a fresh connection to the
model `bench_124m` (bench/bench.py leaves it), times greedily: three 10-token prefills (the first token's time,
median) with the backend's CPU time in user and kernel mode and its page faults per prefill, a decode step after
them (median of 11), then one call on a --long-token prompt and the backend's private memory (RssAnon) after it.
Ends with the server restarted under the shipped setting (runner/db.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import private_mb, prompt_of  # noqa: E402

from gpt_sql.runner.db import connect, restart_embedded  # noqa: E402
from gpt_sql.runner.engine import Params, generate_sql  # noqa: E402
from gpt_sql.runner.models import read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

MODEL = "bench_124m"
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> tuple[float, float, int]:
    """A process's user and kernel CPU seconds and minor page faults so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK, int(fields[7])


def gaps(conn, prompt: str, tokens: int) -> list[float]:
    """Seconds to the first token, then between tokens."""
    times, t = [], time.perf_counter()
    for _ in generate_sql(conn, MODEL, Params(prompt, tokens=tokens, top_n=1)):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times


def measure(prompts: dict[int, str], long: int) -> dict[str, float]:
    conn = connect()
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    gaps(conn, prompts[5], 2)  # the session plans and caches once
    u0, s0, f0 = cpu(pid)
    prefill = statistics.median(gaps(conn, prompts[10], 1)[0] for _ in range(3))
    u1, s1, f1 = cpu(pid)
    decode = statistics.median(gaps(conn, prompts[10], 12)[1:])
    long_times = gaps(conn, prompts[long], 4)
    row = {"prefill 10 (s)": prefill, "its user CPU (s)": (u1 - u0) / 3, "its kernel CPU (s)": (s1 - s0) / 3,
           "its page faults": (f1 - f0) / 3, "decode after 10 (s)": decode,
           f"prefill {long} (s)": long_times[0], f"decode after {long} (s)": statistics.median(long_times[1:]),
           f"kept after {long} (MB)": private_mb(pid) or float("nan")}
    conn.close()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("settings", nargs="+", metavar="NAME=TUNABLES", help="a label and a GLIBC_TUNABLES value")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all the settings (default 2)")
    ap.add_argument("--long", type=int, default=490, help="the long prompt's tokens (default 490)")
    a = ap.parse_args()
    settings = {}
    for arg in a.settings:
        if "=" not in arg:
            ap.error(f"{arg!r}: give NAME=TUNABLES (an empty TUNABLES for glibc's defaults)")
        name, tunables = arg.split("=", 1)
        settings[name] = tunables

    conn = connect()
    prompts = {n: prompt_of(Tokenizer(*read_vocabulary(conn, MODEL)), n) for n in (5, 10, a.long)}
    conn.close()
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    before = os.environ.get("GPT_SQL_SERVER_GLIBC_TUNABLES")
    try:
        for r in range(a.rounds):
            for name, tunables in settings.items():
                os.environ["GPT_SQL_SERVER_GLIBC_TUNABLES"] = tunables
                restart_embedded()
                rows[name].append(measure(prompts, a.long))
                print(f"round {r + 1}, {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name][-1].items()),
                      file=sys.stderr, flush=True)
    finally:
        if before is None:
            os.environ.pop("GPT_SQL_SERVER_GLIBC_TUNABLES", None)
        else:
            os.environ["GPT_SQL_SERVER_GLIBC_TUNABLES"] = before
        restart_embedded()

    keys = list(next(iter(rows.values()))[0])
    print("| setting | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, runs in rows.items():
        cells = []
        for k in keys:
            lo, hi = min(r[k] for r in runs), max(r[k] for r in runs)
            fmt = "{:,.0f}" if "faults" in k or "MB" in k else "{:.3f}"
            cells.append(fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}")
        tunables = f"`{settings[name]}`" if settings[name] else "glibc's defaults"
        print(f"| {name} ({tunables}) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
