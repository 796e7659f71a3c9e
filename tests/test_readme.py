"""The README's examples run as written: its SQL over a user's tables, on a tiny model in the place of gpt2_124m."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPE = dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=2)


def sql_block(heading: str) -> list[str]:
    """The statements of the first ```sql block after a `## heading`."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(f"## {heading}"):]
    block = section[section.index("```sql") + len("```sql"):]
    block = block[:block.index("```")]
    code = "\n".join(line.split("--")[0] for line in block.splitlines())  # comments out (none holds a literal --)
    return [s.strip() for s in code.split(";") if s.strip()]


def test_readme_sql_over_tables_runs(conn, load_tiny):
    load_tiny("readme_tiny", **SHAPE)
    statements = sql_block("From your own queries")
    assert len(statements) >= 8
    with conn.transaction(force_rollback=True):  # the tables and the new column go again
        conn.execute("CREATE TEMP TABLE articles (id int, title text)")
        conn.execute("INSERT INTO articles VALUES (1, 'Happy New Year!'), (2, 'I wish you'), (3, 'New Year')")
        conn.execute("CREATE TEMP TABLE comments (id int, body text)")
        conn.execute("INSERT INTO comments VALUES (1, 'Happy New Year!'), (2, 'SELECT token FROM tokens')")
        conn.execute("CREATE TEMP TABLE reviews (id int, body text)")
        conn.execute("INSERT INTO reviews VALUES (1, 'happy'), (2, 'lazy dog')")
        results = []
        for statement in statements:
            statement = statement.replace("gpt2_124m.", "readme_tiny.")
            statement = re.sub(r"vector\(768\)", f"vector({SHAPE['n_embd']})", statement)
            cur = conn.execute(statement)
            results.append(cur.fetchall() if cur.description else None)
    single = dict(results[0])
    batched = {row[0]: row[1] for row in results[2]}
    assert batched == single  # one generation for all rows gives each row what it gets alone
    assert len(results[3]) == 2 and len(results[-2]) == 3 and len(results[-1]) == 2
