"""Copy a Checkpoint into its own PostgreSQL schema, in one transaction, with binary COPY."""

from __future__ import annotations

import re
import sys
from importlib import resources
from typing import Iterable, Iterator, Mapping

import numpy as np
import psycopg
from psycopg import sql
from tqdm import tqdm

from ..runner.tokenizer import bytes_to_unicode
from ..runner.versions import VersionError, create_extension
from .checkpoint import Checkpoint, CheckpointError
from .functions import create_functions, set_function_search_path
from .unicode_classes import class_ranges

EOT = "<|endoftext|>"
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")


class LoadError(Exception):
    """The model could not be loaded; nothing was changed."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise LoadError(f"model name {name!r} must be lowercase letters, digits and _ (a PostgreSQL schema name)")
    return name


def schema_sql(dtype: str = "float32") -> str:
    """The DDL of one model: schema.sql, then float16.sql for fp16 weights, then weights.sql (the linear)."""
    files = ["schema.sql"] + (["float16.sql"] if dtype == "float16" else []) + ["weights.sql"]
    return "\n".join(resources.files("gpt_sql.sql").joinpath(f).read_text(encoding="utf-8") for f in files)


def tokenizer_rows(ckpt: Checkpoint) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(tokens, merges, byte_tokens) rows; raises CheckpointError if the tokenizer is not GPT-2's byte-level BPE."""
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    tokens = []
    for piece, i in ckpt.encoder.items():
        if piece == EOT:
            data = piece.encode()
        else:
            try:
                data = bytes(byte_decoder[c] for c in piece)
            except KeyError:
                raise CheckpointError(f"{ckpt.source}: token {piece!r} is not in GPT-2's byte-level alphabet")
        tokens.append((i, piece, data))
    merges = []
    for rank, (a, b) in enumerate(ckpt.merges):
        try:
            merges.append((ckpt.encoder[a], ckpt.encoder[b], rank, ckpt.encoder[a + b]))
        except KeyError:
            raise CheckpointError(f"{ckpt.source}: merge {a!r} {b!r} (rank {rank}) names a token not in the vocabulary")
    missing = [c for c in bytes_to_unicode().values() if c not in ckpt.encoder]
    if missing:
        raise CheckpointError(f"{ckpt.source}: the vocabulary lacks {len(missing)} of the 256 byte tokens")
    byte_tokens = [(b, ckpt.encoder[c]) for b, c in bytes_to_unicode().items()]
    return tokens, merges, byte_tokens


# The weights table's partitions (schema.sql) and the matrix each holds; the loader copies (layer, chunk, col, w, b)
# into them and the partition fills in its matrix
MATRICES = {"attn_c_attn": "c_attn", "attn_c_proj": "attn_c_proj", "mlp_c_fc": "c_fc", "mlp_c_proj": "mlp_c_proj"}
LINEAR_COLUMNS = ["layer", "chunk", "col", "w", "b"]
LINEAR_TYPES = ["int4", "int4", "int4", "vector", "float4"]


def weight_rows(ckpt: Checkpoint) -> Iterator[tuple[str, list[str], Iterable[tuple]]]:
    """(table, column types, rows) for every weight table, matrices as one output column per row, in page order
    (page_order) where the query scans them in order. Each tensor is taken from ckpt.params once, as its rows are
    due, and let go after: with a lazily opened checkpoint (open_checkpoint) the load holds one layer's matrix (or
    the embeddings) at a time, not the checkpoint."""
    p, n_layer = ckpt.params, ckpt.hparams["n_layer"]
    d, width = ckpt.hparams["n_embd"], c_proj_chunk_width(ckpt.hparams, ckpt.dtype)
    yield "wte", ["int4", "vector"], page_order(_embedding_rows(p, "wte"),
                                                rows_per_page(["int4", "vector"], d, ckpt.dtype))
    yield "wpe", ["int4", "vector"], _embedding_rows(p, "wpe")
    for ln in ("ln_1", "ln_2"):
        yield ln, ["int4", "vector", "vector"], (
            (i, p[f"h.{i}.{ln}.g"], p[f"h.{i}.{ln}.b"]) for i in range(n_layer))
    yield "ln_f", ["vector", "vector"], [(p["ln_f.g"], p["ln_f.b"])]
    for table, name in (("attn_c_attn", "attn.c_attn"), ("attn_c_proj", "attn.c_proj"), ("mlp_c_fc", "mlp.c_fc")):
        yield table, LINEAR_TYPES, page_order(_column_rows(p, name, n_layer),
                                              rows_per_page(LINEAR_TYPES, d, ckpt.dtype, MATRICES[table]))
    yield "mlp_c_proj", LINEAR_TYPES, page_order(_chunked_column_rows(p, ckpt.hparams, width),
                                                 rows_per_page(LINEAR_TYPES, width, ckpt.dtype, MATRICES["mlp_c_proj"]))


def rows_per_page(types: list[str], dim: int, dtype: str, text: str = "") -> int:
    """How many rows of these columns (int4s, one vector of `dim` weights, float4s, then `text` if given: a weight
    row's matrix) PostgreSQL puts on an 8 kB heap page: a 24-byte page header, and per row a 4-byte line pointer and
    the tuple, 8-byte aligned (a 24-byte header, 4 bytes per int4 and float4, the vector's 8-byte header and its
    weights, and a short text's 1-byte header and its bytes, unaligned). Checked against the pages of loaded tables
    by tests/test_float16.py."""
    text_bytes = 1 + len(text.encode()) if text else 0
    tuple_bytes = 24 + 4 * (len(types) - 1) + 8 + WEIGHT_BYTES[dtype] * dim + text_bytes
    return max(1, (8192 - 24) // ((tuple_bytes + 7) // 8 * 8 + 4))


def page_order(rows: Iterable[tuple], per_page: int) -> Iterator[tuple]:
    """The rows in groups of a page's worth, each group reversed. PostgreSQL fills a page from its end, so the rows
    of a group land in ascending memory in their original order, and a scan in that order (an ordered index scan:
    the linears', the logits' over wte) streams each page forwards instead of jumping back a row at a time. 12
    layers' attn_c_attn in the decode form, 31 interleaved runs: median 28.8 -> 21.4 ms fp32, 16.1 -> 12.0 ms fp16;
    logits over wte (against a seq scan): 41.3 -> 37.0 ms fp32, 27.8 -> 19.1 ms fp16. A wrong per_page costs only
    that gain, never a wrong row."""
    group: list[tuple] = []
    for row in rows:
        group.append(row)
        if len(group) == per_page:
            yield from reversed(group)
            group = []
    yield from reversed(group)


def _embedding_rows(p: Mapping[str, np.ndarray], name: str) -> Iterator[tuple]:
    """(id, vector) rows; the table is read when the first row is asked for, and let go with the last."""
    yield from enumerate(p[name])


def _column_rows(p: Mapping[str, np.ndarray], name: str, n_layer: int) -> Iterator[tuple]:
    """(layer, chunk 0, col, weights of that output column, its bias), a layer's matrix read at a time."""
    for i in range(n_layer):
        w = np.ascontiguousarray(p[f"h.{i}.{name}.w"].T)
        b = p[f"h.{i}.{name}.b"]
        for col in range(w.shape[0]):
            yield i, 0, col, w[col], float(b[col])
        del w, b  # before the next layer's matrix is read


# The most a weight row's vector may take (its data bytes) and still share an 8 kB heap page with the row's other
# columns and headers (PostgreSQL's largest tuple is 8,160 bytes; weights are stored PLAIN, never TOASTed)
MAX_ROW_BYTES = 8000
WEIGHT_BYTES = {"float32": 4, "float16": 2}


def c_proj_chunk_width(hp: dict[str, int], dtype: str) -> int:
    """How many of mlp_c_proj's 4*n_embd inputs one row holds: all of them if they fit a page, else the widest
    even share (n_inner/2, n_inner/3, ...) that does. A row costs a fixed ~0.5 us to reach in a decode step besides
    its products, so fewer, wider rows are faster (124M: 4 chunks of 768 -> 2 of 1536 fp32, 1 of 3072 fp16)."""
    n_inner = 4 * hp["n_embd"]
    for parts in range(1, n_inner + 1):
        if n_inner % parts == 0 and n_inner // parts * WEIGHT_BYTES[dtype] <= MAX_ROW_BYTES:
            return n_inner // parts
    raise AssertionError("unreachable: one input per row fits")


def _chunked_column_rows(p: Mapping[str, np.ndarray], hp: dict[str, int], width: int) -> Iterator[tuple]:
    """mlp_c_proj's rows: its 4*n_embd inputs cut into chunks of `width` (c_proj_chunk_width), a vector per chunk and
    output column, the bias on chunk 0."""
    d = hp["n_embd"]
    for i in range(hp["n_layer"]):
        w = p[f"h.{i}.mlp.c_proj.w"]
        b = p[f"h.{i}.mlp.c_proj.b"]
        for chunk in range(w.shape[0] // width):
            wc = np.ascontiguousarray(w[chunk * width:(chunk + 1) * width].T)
            for col in range(d):
                yield i, chunk, col, wc[col], float(b[col]) if chunk == 0 else 0.0
        del w, b, wc


def halfvec_tables(cur: psycopg.Cursor, schema: str) -> set[str]:
    """The tables whose weights are halfvec (float16.sql), to COPY them as such."""
    cur.execute("SELECT table_name FROM information_schema.columns WHERE table_schema = %s AND column_name = 'w'"
                " AND udt_name = 'halfvec'", (schema,))
    return {r[0] for r in cur.fetchall()}


def _copy(cur: psycopg.Cursor, table: str, types: list[str], rows: Iterable[tuple], bar: tqdm,
          columns: list[str] | None = None) -> int:
    from pgvector import HalfVector

    n = 0
    halfvec = [t == "halfvec" for t in types]
    target = sql.Identifier(table)
    if columns:
        target = sql.SQL("{} ({})").format(target, sql.SQL(", ").join(map(sql.Identifier, columns)))
    with cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(target)) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(tuple(HalfVector(v) if h else v for v, h in zip(row, halfvec)) if any(halfvec) else row)
            n += 1
            bar.update(sum(v.nbytes for v in row if isinstance(v, np.ndarray)))
            if n % 4096 == 0:
                bar.set_postfix_str(f"{table}: {n:,} rows", refresh=False)
    return n


def load(conn: psycopg.Connection, ckpt: Checkpoint, name: str, progress: bool | None = None) -> dict:
    """Load `ckpt` as schema `name`, replacing any previous version atomically. Returns row counts."""
    phase = ["load"]
    try:
        return _load(conn, ckpt, name, progress, phase)
    except VersionError as e:
        raise LoadError(f"cannot load {name}: {e}") from None
    except psycopg.errors.InsufficientPrivilege as e:
        msg = e.diag.message_primary or str(e).strip()
        if msg.startswith("permission denied for database"):
            msg = f"permission denied to create schema {name}__loading ({msg})"
        raise LoadError(f"cannot load {name}: {msg}; models are loaded by a role that may create schemas "
                        "(see 'Least privilege' in the README)") from None
    except psycopg.Error as e:
        if not conn.broken:
            raise
        msg = e.diag.message_primary or str(e).strip().splitlines()[0]
        if phase[0] == "commit":
            raise LoadError(f"lost the connection to the server while committing {name} ({msg}): "
                            "see `gpt-sql models` for which version is loaded") from None
        raise LoadError(f"lost the connection to the server while loading {name} ({msg}); nothing was "
                        "committed: the previous version, if any, is unchanged") from None


def _load(conn: psycopg.Connection, ckpt: Checkpoint, name: str, progress: bool | None, phase: list[str]) -> dict:
    from pgvector.psycopg import register_vector

    check_name(name)
    tokens, merges, byte_tokens = tokenizer_rows(ckpt)
    if EOT not in ckpt.encoder:
        raise CheckpointError(f"{ckpt.source}: the vocabulary has no {EOT} token")
    staging = f"{name}__loading"
    if progress is None:
        progress = sys.stderr.isatty()
    total_bytes = ckpt.n_params * 4  # the weights as float32 arrays, as _copy counts them
    counts: dict[str, int] = {}
    with conn.transaction():
        create_extension(conn)  # checks the server's versions first: below the floor, nothing is made
        register_vector(conn)
        replacing = _existing(conn, name)
        if replacing:  # fail before the copy, not after it (checked again under the lock, before the drop)
            _refuse_outside_dependents(conn, name, "reloading")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(staging)))
        conn.execute(sql.SQL("SET LOCAL search_path = {}, public").format(sql.Identifier(staging)))
        conn.execute(schema_sql(ckpt.dtype))
        cur = conn.cursor()
        create_functions(cur)
        hp = ckpt.hparams
        cur.execute(
            "INSERT INTO hparams (n_vocab, n_ctx, n_embd, n_head, n_layer, eot, source, n_params, dtype)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (hp["n_vocab"], hp["n_ctx"], hp["n_embd"], hp["n_head"], hp["n_layer"], ckpt.encoder[EOT],
             ckpt.source, ckpt.n_params, ckpt.dtype))
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {name}", disable=not progress,
                  file=sys.stderr) as bar:
            counts["tokens"] = _copy(cur, "tokens", ["int4", "text", "bytea"], tokens, bar)
            counts["merges"] = _copy(cur, "merges", ["int4", "int4", "int4", "int4"], merges, bar)
            counts["byte_tokens"] = _copy(cur, "byte_tokens", ["int4", "int4"], byte_tokens, bar)
            counts["char_classes"] = _copy(cur, "char_classes", ["int4", "text"], class_ranges(), bar)
            halfvec = halfvec_tables(cur, staging)  # what float16.sql made halfvec
            for table, types, rows in weight_rows(ckpt):
                if table in halfvec:
                    types = ["halfvec" if t == "vector" else t for t in types]
                counts[table] = _copy(cur, table, types, rows, bar, LINEAR_COLUMNS if table in MATRICES else None)
        verify_counts(cur, counts, expected_counts(ckpt, len(merges)))
        for table in counts:
            cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
        if replacing:
            # Queries read hparams first and keep it locked to the end; locking it first here makes the swap wait
            # for running queries of this model, and new ones wait for the swap, with no lock-order cycle
            # (DROP ... CASCADE then takes the other tables one by one).
            if replacing == "model":
                cur.execute(sql.SQL("LOCK TABLE {}.hparams IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(name)))
            copy_privileges(cur, name, staging)  # GRANTs (e.g. `gpt-sql grant`) outlive the reload
            _refuse_outside_dependents(conn, name, "reloading")
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
        cur.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(staging), sql.Identifier(name)))
        set_function_search_path(cur, name)
        cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS 'gpt-sql model'").format(sql.Identifier(name)))
        phase[0] = "commit"
    return counts


def drop(conn: psycopg.Connection, name: str) -> None:
    """Drop the loaded model `name` (its schema, with everything in it), in one transaction; LoadError if there is
    no such model, the schema is not one the loader made, or objects outside it depend on it."""
    check_name(name)
    with conn.transaction():
        kind = _existing(conn, name)
        if kind is None:
            raise LoadError(f"model {name!r} is not loaded (see `gpt-sql models`)")
        if kind == "model":  # as a reload does: wait for running generations of this model, block new ones
            conn.execute(sql.SQL("LOCK TABLE {}.hparams IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(name)))
        _refuse_outside_dependents(conn, name)
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


# What DROP SCHEMA ... CASCADE would take with it: everything in the schema, then (transitively) whatever depends
# on those objects. An object without a schema of its own (a view's rule, a column default, a trigger, a foreign
# key) counts as its table's or view's, named through its internal or automatic dependency on that relation.
_OUTSIDE_QUERY = """
WITH RECURSIVE doomed(classid, objid) AS (
    SELECT d.classid, d.objid FROM pg_depend d
    WHERE d.refclassid = 'pg_namespace'::regclass
      AND d.refobjid = (SELECT oid FROM pg_namespace WHERE nspname = %(s)s)
  UNION
    SELECT d.classid, d.objid FROM pg_depend d JOIN doomed o ON d.refclassid = o.classid AND d.refobjid = o.objid
    WHERE d.deptype IN ('n', 'a', 'i')
)
SELECT DISTINCT coalesce(owner.what, pg_describe_object(o.classid, o.objid, 0))
FROM doomed o
CROSS JOIN LATERAL pg_identify_object(o.classid, o.objid, 0) id
LEFT JOIN LATERAL (
    SELECT c.relnamespace::regnamespace::text AS schema, pg_describe_object('pg_class'::regclass, c.oid, 0) AS what
    FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid
    WHERE d.classid = o.classid AND d.objid = o.objid AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i')
    LIMIT 1
) owner ON id.schema IS NULL
WHERE coalesce(id.schema, owner.schema) IS DISTINCT FROM %(s)s
  AND id.schema IS DISTINCT FROM 'pg_toast'  -- a table's TOAST goes with its table, reported itself if outside
ORDER BY 1
"""


def _refuse_outside_dependents(conn: psycopg.Connection, name: str, doing: str = "dropping") -> None:
    """LoadError if dropping schema `name` (for a drop, or to replace it by a reload) would also drop objects
    outside it (a user's view over the model's `complete()`, say): CASCADE would remove them silently."""
    outside = [r[0] for r in conn.execute(_OUTSIDE_QUERY, {"s": name}).fetchall()]
    if outside:
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        raise LoadError(f"model {name!r} is used by {', '.join(outside[:5])}{more}; "
                        f"drop or change those first ({doing} the model would remove them too)")


def _existing(conn: psycopg.Connection, name: str) -> str | None:
    """"model" if `name` is a loaded model to replace ("schema" if it lacks its hparams), None if there is no
    such schema; LoadError if it is a schema that is not a model (a reload drops the old schema with CASCADE:
    `--name public` would take pgvector, and with it every model's vector columns)."""
    row = conn.execute("SELECT obj_description(oid, 'pg_namespace') = 'gpt-sql model',"
                       " EXISTS (SELECT FROM pg_class c WHERE c.relnamespace = n.oid AND c.relname = 'hparams')"
                       " FROM pg_namespace n WHERE nspname = %s", (name,)).fetchone()
    if row is None:
        return None
    if not row[0]:
        raise LoadError(f"schema {name!r} exists and is not a gpt-sql model; load under another --name")
    return "model" if row[1] else "schema"


PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN",
              "USAGE", "CREATE", "EXECUTE"}
_ACL_QUERY = """
SELECT 'schema', '', a.grantee, a.privilege_type, a.is_grantable
FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
WHERE n.nspname = %(s)s AND a.grantee <> n.nspowner
UNION ALL
SELECT 'table', c.relname, a.grantee, a.privilege_type, a.is_grantable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
WHERE n.nspname = %(s)s AND c.relkind IN ('r', 'p', 'v') AND a.grantee <> c.relowner
UNION ALL
SELECT 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', a.grantee, a.privilege_type, a.is_grantable
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace,
     aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
WHERE n.nspname = %(s)s AND a.grantee <> p.proowner
"""


def copy_privileges(cur: psycopg.Cursor, old: str, new: str) -> None:
    """Give `new`'s schema, tables and functions the privileges the same objects of `old` have (besides their
    owner's): the loader recreates the schema on every load, and ACLs live on the objects."""
    def acl(schema: str) -> set[tuple]:
        cur.execute(_ACL_QUERY, {"s": schema})
        return {tuple(r) for r in cur.fetchall()}

    before, after = acl(old), acl(new)
    cur.execute("SELECT 'table', relname, relname, NULL FROM pg_class"
                " WHERE relnamespace = %(s)s::regnamespace AND relkind IN ('r', 'p', 'v')"
                " UNION ALL SELECT 'function', proname || '(' || pg_get_function_identity_arguments(oid) || ')',"
                " proname, pg_get_function_identity_arguments(oid) FROM pg_proc"
                " WHERE pronamespace = %(s)s::regnamespace", {"s": new})
    targets = {(kind, obj): (name, args) for kind, obj, name, args in cur.fetchall()}
    targets[("schema", "")] = (new, None)
    cur.execute("SELECT oid, rolname FROM pg_roles")
    roles = dict(cur.fetchall())

    def statement(verb: str, kind: str, obj: str, grantee: int, priv: str, grantable: bool):
        if priv not in PRIVILEGES or (kind, obj) not in targets or (grantee and grantee not in roles):
            return None
        name, args = targets[(kind, obj)]
        target = {"schema": sql.SQL("SCHEMA {}").format(sql.Identifier(new)),
                  "table": sql.SQL("TABLE {}").format(sql.Identifier(new, name)),
                  # the argument list as PostgreSQL prints it (format_type quotes what needs quoting)
                  "function": sql.SQL("FUNCTION {}({})").format(sql.Identifier(new, name), sql.SQL(args or ""))}[kind]
        who = sql.Identifier(roles[grantee]) if grantee else sql.SQL("PUBLIC")
        if verb == "GRANT":
            return sql.SQL("GRANT {} ON {} TO {}{}").format(sql.SQL(priv), target, who,
                                                            sql.SQL(" WITH GRANT OPTION" if grantable else ""))
        return sql.SQL("REVOKE {} ON {} FROM {}").format(sql.SQL(priv), target, who)

    for verb, entries in (("REVOKE", after - before), ("GRANT", before - after)):
        for kind, obj, grantee, priv, grantable in sorted(entries, key=str):
            stmt = statement(verb, kind, obj, grantee, priv, grantable)
            if stmt is not None:
                cur.execute(stmt)


def expected_counts(ckpt: Checkpoint, n_merges: int) -> dict[str, int]:
    hp = ckpt.hparams
    d, n_layer = hp["n_embd"], hp["n_layer"]
    return {
        "tokens": hp["n_vocab"], "merges": n_merges, "byte_tokens": 256,
        "wte": hp["n_vocab"], "wpe": hp["n_ctx"], "ln_1": n_layer, "ln_2": n_layer, "ln_f": 1,
        "attn_c_attn": n_layer * 3 * d, "attn_c_proj": n_layer * d, "mlp_c_fc": n_layer * 4 * d,
        "mlp_c_proj": n_layer * d * (4 * d // c_proj_chunk_width(hp, ckpt.dtype)),
    }


def verify_counts(cur: psycopg.Cursor, copied: dict[str, int], expected: dict[str, int]) -> None:
    """Count rows in the database (not what we think we sent) against what the checkpoint implies."""
    for table, n in expected.items():
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        got = cur.fetchone()[0]
        if got != n or copied.get(table) != n:
            raise LoadError(f"table {table}: {got} rows in the database, {n} expected from the checkpoint")
