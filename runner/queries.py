"""The SQL the runner sends: sql/generate.sql as shipped, or the same pipeline with another final SELECT.

sql/generate.sql is the one source of the pipeline; the variants only replace what follows its `-- decode:`
line, so psql users and the runner run the same CTEs.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

TAIL_MARKER = "-- decode:"

TAILS = {
    "text": """-- complete: the whole completion as one text value (a character cut short becomes U+FFFD)
SELECT decode_utf8(coalesce(string_agg((SELECT t.bytes FROM tokens t WHERE t.id = g.token), ''::bytea
                                       ORDER BY g.step), ''::bytea)) AS completion
FROM generate g
WHERE g.kind = 'token' AND g.step > 0;
""",
    # the top_n candidates for the first new token, most likely first
    "next": """-- next: the top_n candidates for the next token with their probabilities (softmax of logits / temperature)
SELECT g.token, decode_utf8(t.bytes) AS text, t.bytes, g.prob
FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t
WHERE g.kind = 'candidate' AND g.step = 1
ORDER BY g.prob DESC, g.token;
""",
    # the prompt's token ids as one array (the tokenize() SQL function)
    "ids": """-- ids: the prompt's token ids as one array
SELECT coalesce(array_agg(e.token ORDER BY e.pos), '{}') FROM encode e;
""",
    # the prompt's token ids, nothing else is computed
    "tokenize": """-- tokenize: the prompt's token ids and their bytes
SELECT e.pos, e.token, (SELECT t.bytes FROM tokens t WHERE t.id = e.token) AS bytes
FROM encode e
ORDER BY e.pos;
""",
}


@lru_cache(maxsize=None)
def generate_sql() -> str:
    return resources.files("gpt_sql.sql").joinpath("generate.sql").read_text(encoding="utf-8")


def query(kind: str = "generate") -> str:
    """`generate` (one row per new token), `text`, `next`, `tokenize` or `ids`."""
    base = generate_sql()
    if kind == "generate":
        return base
    head, sep, _ = base.rpartition(TAIL_MARKER)
    if not sep:
        raise RuntimeError(f"sql/generate.sql lost its '{TAIL_MARKER}' line")
    return head + TAILS[kind]
