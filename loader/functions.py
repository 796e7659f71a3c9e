"""A model's SQL functions, made at load time from the one pipeline in sql/generate.sql.

Each function is the query as shipped (runner/queries.py: the same CTEs, one of its final SELECTs) with its
`settings` CTE, which reads the gpt.* settings, replaced by the function's arguments. So there is no second copy
of the pipeline to keep in step, and `SELECT gpt2_124m.complete(title, 20) FROM articles` gives the tokens
`gpt-sql run` gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from ..runner import queries
from ..runner.db import SESSION_SETTINGS

# the CTE as sql/generate.sql writes it: from its name to the line that closes it; and its columns' types
SETTINGS = {"prompts": "text[]", "tokens": "text", "temperature": "text", "top_n": "text", "seed": "text",
            "seeds": "bigint[]", "task": "text", "top_p": "text", "logprobs": "text", "stop": "text[]", "layer": "text"}
SETTINGS_HEAD = f"settings({', '.join(SETTINGS)}) AS ("
SETTINGS_CTE = re.compile(r"^" + re.escape(SETTINGS_HEAD) + r"\n.*?\n\),$", re.M | re.S)

SAMPLING = "tokens int DEFAULT 10, temperature float8 DEFAULT 1, top_n int DEFAULT 5"
ONE, MANY = "prompt text", "prompts text[]"
# the generation's arguments as settings: $1 the prompt(s), $2.. the rest in the order the signature gives them
GENERATION = {"tokens": "$2::text", "temperature": "$3::text", "top_n": "$4::text", "stop": "$6", "top_p": "$7::text"}
ONE_GENERATION = {"prompts": "ARRAY[$1]", "seed": "$5::text", **GENERATION}
MANY_GENERATION = {"prompts": "$1", "seeds": "$5", **GENERATION}
STOP_TOP_P = "stop text[] DEFAULT NULL, top_p float8 DEFAULT 1"
TOKENS = "TABLE (step int, token int, text text, bytes bytea, prob float8, alternatives jsonb)"


@dataclass(frozen=True)
class Function:
    name: str
    args: str  # its arguments as CREATE FUNCTION writes them
    returns: str
    variant: str  # of the query (runner/queries.py)
    settings: dict[str, str]  # the settings CTE's columns from its arguments; the others NULL
    columns: str | None = None  # what it returns of the variant's columns, when not all of them


FUNCTIONS = [
    Function("generate", f"{ONE}, {SAMPLING}, seed bigint DEFAULT 0, {STOP_TOP_P}, logprobs int DEFAULT 0", TOKENS,
             "generate", {**ONE_GENERATION, "logprobs": "$8::text"}, "step, token, text, bytes, prob, alternatives"),
    Function("generate", f"{MANY}, {SAMPLING}, seeds bigint[] DEFAULT NULL, {STOP_TOP_P}, logprobs int DEFAULT 0",
             TOKENS.replace("TABLE (", "TABLE (i int, "), "generate", {**MANY_GENERATION, "logprobs": "$8::text"}),
    Function("complete", f"{ONE}, {SAMPLING}, seed bigint DEFAULT 0, {STOP_TOP_P}", "text", "text", ONE_GENERATION,
             "completion"),
    Function("complete", f"{MANY}, {SAMPLING}, seeds bigint[] DEFAULT NULL, {STOP_TOP_P}", "text[]", "texts",
             MANY_GENERATION),
    Function("next_tokens", "prompt text, top int DEFAULT 5, temperature float8 DEFAULT 1",
             "TABLE (token int, text text, bytes bytea, prob float8)", "next",
             {"prompts": "ARRAY[$1]", "tokens": "'1'", "temperature": "$3::text", "top_n": "$2::text"}),
    Function("tokenize", "prompt text", "int[]", "ids", {"prompts": "ARRAY[$1]"}),
    Function("inspect", "prompt text",
             "TABLE (kind text, layer int, head int, pos int, token int, prob float8, weights real[])", "inspect",
             {"prompts": "ARRAY[$1]", "tokens": "'1'", "task": "'inspect'"}),
    Function("score", "text text", "TABLE (pos int, token int, text text, logprob float8)", "score",
             {"prompts": "ARRAY[$1]", "task": "'score'"}, "pos, token, text, logprob"),
    Function("perplexity", "text text", "float8", "perplexity", {"prompts": "ARRAY[$1]", "task": "'score'"},
             "perplexity"),
    Function("embed", "text text, layer int DEFAULT NULL", "vector", "embed",
             {"prompts": "ARRAY[$1]", "task": "'embed'", "layer": "$2::text"}, "embedding"),
    Function("classify", "text text, choices text[]", "TABLE (choice text, prob float8)", "classify",
             {"prompts": "ARRAY[$1] || $2", "task": "'classify'"}, "text, prob"),
]


def function_body(f: Function, base: str | None = None) -> str:
    """The query variant with the function's arguments where the settings were, returning `columns` of its own
    (of `base`, another version of sql/generate.sql, if given)."""
    query = queries.query(f.variant, base)
    unknown = set(f.settings) - set(SETTINGS)
    if unknown:
        raise RuntimeError(f"{f.name}: no setting {', '.join(sorted(unknown))}")
    values = ", ".join(f.settings.get(column, f"NULL::{type_}") for column, type_ in SETTINGS.items())
    body, n = SETTINGS_CTE.subn(lambda _: f"{SETTINGS_HEAD}\n    SELECT {values}\n),", query)
    if n != 1:
        raise RuntimeError(f"sql/generate.sql lost its {SETTINGS_HEAD} CTE")
    if f.columns:
        body = f"SELECT {f.columns} FROM (\n{body.rstrip().rstrip(';')}\n) query"
    return body


# How each function is declared. STABLE: a call reads its model's tables and changes nothing, and the same arguments
# give the same result (every draw is seeded: u = md5('<seed>:<step>'), never random()), within a statement and
# across them while the model is not reloaded. Not IMMUTABLE, since it reads tables. PARALLEL SAFE: nothing in a body
# writes, draws from a session's random state, or uses temporary tables; every helper it calls is PARALLEL SAFE
# (sql/schema.sql, sql/weights.sql, pgvector's functions), and its SET clauses are allowed in a worker. So
# `SELECT f(col) FROM t` may run its calls in parallel workers, each call whole in one process.
LABELS = "STABLE PARALLEL SAFE"


def create_functions(cur) -> None:
    """Create the functions in the schema being loaded (first on search_path), whose tables their bodies are
    checked against now; set_function_search_path pins them once the schema has its final name, and their COST
    once the tables are filled."""
    for f in FUNCTIONS:
        cur.execute(sql.SQL("CREATE FUNCTION {}({}) RETURNS {} LANGUAGE sql {} AS {}").format(
            sql.Identifier(f.name), sql.SQL(f.args), sql.SQL(f.returns), sql.SQL(LABELS),
            sql.Literal(function_body(f))))


# A call's fixed work, whatever the model's size (tokenizing in SQL, planning the pipeline), in the planner's unit of
# cpu_operator_cost: a call on a tiny test model took 0.1-0.3 s here, and a sequential scan the planner costs at
# 20,740 took 0.17-0.24 s; so about 25,000, i.e. 10,000,000 x cpu_operator_cost (0.0025)
CALL_COST = 10_000_000


def function_cost(cur, schema: str) -> int:
    """The COST of a call of one of `schema`'s functions: its fixed work and one read of every page of the model's
    tables (a call reads all the weights at least once), as the planner costs a sequential page. A plain
    `SELECT f(col) FROM t` then gets a parallel plan wherever the table may have workers: the planner weighs each
    call against parallel_setup_cost (1,000 page reads by default), not a call's 100 x cpu_operator_cost of a
    default SQL function."""
    pages, page_cost = cur.execute(
        "SELECT coalesce(sum(pg_relation_size(c.oid)), 0) / current_setting('block_size')::float8,"
        "       current_setting('seq_page_cost')::float8 / current_setting('cpu_operator_cost')::float8"
        " FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %s)"
        "  AND c.relkind = 'r'", (schema,)).fetchone()
    return CALL_COST + round(pages * page_cost)


def set_function_search_path(cur, schema: str) -> None:
    """Pin each function to its model (whatever the caller's search_path), give it the settings a
    generation needs (work_mem for the KV cache) and its COST (function_cost, once the tables are filled); run
    again after the schema is renamed."""
    settings = {k: v for k, v in SESSION_SETTINGS.items() if k != "client_connection_check_interval"}
    cost = function_cost(cur, schema)
    for f in FUNCTIONS:
        signature = sql.SQL("{}.{}({})").format(sql.Identifier(schema), sql.Identifier(f.name),
                                                sql.SQL(", ".join(a.split(" DEFAULT ")[0] for a in f.args.split(", "))))
        cur.execute(sql.SQL("ALTER FUNCTION {} SET search_path = {}, public").format(signature, sql.Identifier(schema)))
        cur.execute(sql.SQL("ALTER FUNCTION {} COST {}").format(signature, sql.SQL(str(int(cost)))))
        for key, value in settings.items():
            cur.execute(sql.SQL("ALTER FUNCTION {} SET {} = {}").format(signature, sql.Identifier(key),
                                                                         sql.Literal(value)))
