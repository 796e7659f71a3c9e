"""The SQL the runner sends: sql/generate.sql's pipeline with one of its final SELECTs.

sql/generate.sql is the one source of the query. After its `-- decode:` line come the final SELECTs, one per
task, as psql `\\if` branches on variables the task files in sql/ set (`\\if :{?gpt_score}` ... `\\else` the
generate one `\\endif`). query() cuts out the pipeline and one branch's SELECT, so psql users, the runner and the
model's SQL functions run the same text, and no psql meta-command reaches the server.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

TAIL_MARKER = "-- decode:"
# the psql lines around the branches: \if or \elif on a variable gpt_KIND, \else (generate), \endif, \unset gpt_KIND
BRANCH = re.compile(r"\\(?:el)?if :\{\?gpt_(?P<kind>\w+)\}|\\(?P<other>else)|\\endif|\\unset gpt_\w+")


@lru_cache(maxsize=None)
def generate_sql() -> str:
    return resources.files("gpt_sql.sql").joinpath("generate.sql").read_text(encoding="utf-8")


@lru_cache(maxsize=8)
def _split(base: str) -> tuple[str, dict[str, str]]:
    """base's pipeline (through the marker's comment) and its final SELECTs by kind; none when base is a version
    from before the branches (one final SELECT, the generate one)."""
    head, sep, rest = base.partition(TAIL_MARKER)
    if not sep:
        raise RuntimeError(f"sql/generate.sql lost its '{TAIL_MARKER}' line")
    head += sep
    branches: dict[str, str] = {}
    kind = None
    for line in rest.splitlines(keepends=True):
        if not line.startswith("\\"):
            if kind is None:
                head += line
            else:
                branches[kind] += line
            continue
        m = BRANCH.fullmatch(line.rstrip())
        if m is None:
            raise RuntimeError(f"sql/generate.sql: a psql command queries.py does not know: {line.rstrip()}")
        if m["kind"] or m["other"]:
            kind = m["kind"] or "generate"
            branches[kind] = ""
    return head, branches


def kinds() -> list[str]:
    """The final SELECTs sql/generate.sql has."""
    return list(_split(generate_sql())[1])


def query(kind: str = "generate", base: str | None = None) -> str:
    """`generate` (one row per new token), `text`, `texts`, `next`, `inspect`, `score`, `perplexity`, `embed`,
    `classify`, `tokenize` or `ids`; of `base` (another version of sql/generate.sql, for benchmarks) if given.
    A version from before the branches gets the shipped file's SELECT for kinds other than generate."""
    head, branches = _split(generate_sql() if base is None else base)
    if not branches:  # a version from before the branches: it is the generate query
        if kind == "generate":
            return base
        head, branches = head.partition(TAIL_MARKER)[0], _split(generate_sql())[1]
    if kind not in branches:
        raise ValueError(f"no query variant {kind!r}: one of {', '.join(branches)}")
    return head + branches[kind]
