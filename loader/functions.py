"""A model's SQL functions, made at load time from the one pipeline in sql/generate.sql.

Each function is the query as shipped (runner/queries.py: the same CTEs, one of its final SELECTs) with its
`settings` CTE, which reads the gpt.* settings, replaced by the function's arguments. So there is no second copy
of the pipeline to keep in step, and `SELECT gpt2_124m.complete(title, 20) FROM articles` gives the tokens
`gpt-sql run` gives.
"""

from __future__ import annotations

import re

from psycopg import sql

from ..runner import queries
from ..runner.db import SESSION_SETTINGS

# the CTE as sql/generate.sql writes it: from its name to the line that closes it
SETTINGS_CTE = re.compile(r"^settings\(prompts, tokens, temperature, top_n, seed, seeds, inspect\) AS \(\n.*?\n\),$",
                          re.M | re.S)

ONE = "prompt text, tokens int DEFAULT 10, temperature float8 DEFAULT 1, top_n int DEFAULT 5, seed bigint DEFAULT 0"
MANY = ("prompts text[], tokens int DEFAULT 10, temperature float8 DEFAULT 1, top_n int DEFAULT 5, "
        "seeds bigint[] DEFAULT NULL")
# the settings CTE's columns from a function's arguments: (prompts, tokens, temperature, top_n, seed, seeds, inspect)
ONE_SETTINGS = "ARRAY[$1], $2::text, $3::text, $4::text, $5::text, NULL::bigint[], 'off'"
MANY_SETTINGS = "$1, $2::text, $3::text, $4::text, NULL::text, $5, 'off'"

# (name, arguments, what it returns, the query's variant, the settings from the arguments, and the variant's columns
# it returns when not all of them)
FUNCTIONS = [
    ("generate", ONE, "TABLE (step int, token int, text text, bytes bytea, prob float8)", "generate", ONE_SETTINGS,
     "step, token, text, bytes, prob"),
    ("generate", MANY, "TABLE (i int, step int, token int, text text, bytes bytea, prob float8)", "generate",
     MANY_SETTINGS, None),
    ("complete", ONE, "text", "text", ONE_SETTINGS, "completion"),
    ("complete", MANY, "text[]", "texts", MANY_SETTINGS, None),
    ("next_tokens", "prompt text, top int DEFAULT 5, temperature float8 DEFAULT 1",
     "TABLE (token int, text text, bytes bytea, prob float8)", "next",
     "ARRAY[$1], '1', $3::text, $2::text, '0', NULL::bigint[], 'off'", None),
    ("tokenize", "prompt text", "int[]", "ids", "ARRAY[$1], '1', '1', '1', '0', NULL::bigint[], 'off'", None),
    ("inspect", "prompt text",
     "TABLE (kind text, layer int, head int, pos int, token int, prob float8, weights real[])", "inspect",
     "ARRAY[$1], '1', '1', '1', '0', NULL::bigint[], 'on'", None),
]


def function_body(variant: str, arguments: str, columns: str | None = None) -> str:
    """The query variant with the function's arguments where the settings were, returning `columns` of its own."""
    query = queries.query(variant)
    body, n = SETTINGS_CTE.subn(
        lambda _: f"settings(prompts, tokens, temperature, top_n, seed, seeds, inspect) AS (\n    SELECT {arguments}\n),",
        query)
    if n != 1:
        raise RuntimeError("sql/generate.sql lost its settings(prompts, tokens, temperature, top_n, seed, seeds, "
                           "inspect) CTE")
    if columns:
        body = f"SELECT {columns} FROM (\n{body.rstrip().rstrip(';')}\n) query"
    return body


def create_functions(cur) -> None:
    """Create the functions in the schema being loaded (first on search_path), whose tables their bodies are
    checked against now; set_function_search_path pins them once the schema has its final name."""
    for name, args, returns, variant, arguments, columns in FUNCTIONS:
        cur.execute(sql.SQL("CREATE FUNCTION {}({}) RETURNS {} LANGUAGE sql VOLATILE AS {}").format(
            sql.Identifier(name), sql.SQL(args), sql.SQL(returns),
            sql.Literal(function_body(variant, arguments, columns))))


def set_function_search_path(cur, schema: str) -> None:
    """Pin each function to its model (whatever the caller's search_path) and give it the settings a
    generation needs (work_mem for the KV cache); run again after the schema is renamed."""
    settings = {k: v for k, v in SESSION_SETTINGS.items() if k != "client_connection_check_interval"}
    for name, args, *_ in FUNCTIONS:
        signature = sql.SQL("{}.{}({})").format(sql.Identifier(schema), sql.Identifier(name),
                                                sql.SQL(", ".join(a.split(" DEFAULT ")[0] for a in args.split(", "))))
        cur.execute(sql.SQL("ALTER FUNCTION {} SET search_path = {}, public").format(signature, sql.Identifier(schema)))
        for key, value in settings.items():
            cur.execute(sql.SQL("ALTER FUNCTION {} SET {} = {}").format(signature, sql.Identifier(key),
                                                                         sql.Literal(value)))
