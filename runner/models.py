"""Which models are loaded, and reading one back out of its tables (for the NumPy engine)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from ..loader.checkpoint import Checkpoint, validate


class ModelError(Exception):
    """No such model, or none loaded."""


@dataclass
class ModelInfo:
    name: str
    n_params: int
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int
    size_bytes: int
    source: str
    dtype: str  # of the weight matrices: float32 (vector) or float16 (halfvec)
    older_layout: bool = False  # loaded by an earlier gpt-sql into slower tables: loading it again updates them


def model_names(conn: psycopg.Connection) -> list[str]:
    """Schemas the loader made (they carry the comment 'gpt-sql model') that this role may use. Reads the catalog
    only, so it does not wait behind a reload of some model, which locks that model's tables."""
    return [r[0] for r in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE obj_description(oid, 'pg_namespace') = 'gpt-sql model'"
        " AND has_schema_privilege(oid, 'USAGE') ORDER BY nspname")]  # a role may be granted some models only


def list_models(conn: psycopg.Connection) -> list[ModelInfo]:
    """The models with their shapes and size on disk."""
    out = []
    for name in model_names(conn):
        row = conn.execute(sql.SQL(
            "SELECT n_params, n_vocab, n_ctx, n_embd, n_head, n_layer, source, h.weight_dtype,"
            " (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
            "  WHERE c.relnamespace = {0}::regnamespace AND c.relkind = 'r')::bigint,"
            # the current layout has the weights as a table partitioned by matrix (252f6e6); older ones a view
            " NOT EXISTS (SELECT FROM pg_class c"
            "             WHERE c.relnamespace = {0}::regnamespace AND c.relname = 'weights' AND c.relkind = 'p')"
            " FROM (SELECT h.*, to_jsonb(h) ->> 'dtype' AS weight_dtype FROM {1}.hparams h) h"  # older loads: fp32
            ).format(sql.Literal(name), sql.Identifier(name))).fetchone()
        n_params, n_vocab, n_ctx, n_embd, n_head, n_layer, source, dtype, size, older = row
        out.append(ModelInfo(name, n_params, n_vocab, n_ctx, n_embd, n_head, n_layer, size or 0, source,
                             dtype or "float32", older))
    return out


def resolve_model(conn: psycopg.Connection, name: str | None) -> str:
    """The schema to run: `name` if it is loaded, else the only loaded model (gpt2_124m first if several)."""
    names = model_names(conn)
    if name:
        if name not in names:
            have = ", ".join(names) if names else "none"
            raise ModelError(f"model {name!r} is not loaded (loaded: {have}); load it with `gpt-sql load PATH --name {name}`")
        return name
    if not names:
        raise ModelError("no model is loaded: run `gpt-sql download 124M` or `gpt-sql load PATH`")
    return "gpt2_124m" if "gpt2_124m" in names else names[0]


def read_vocabulary(conn: psycopg.Connection, name: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A loaded model's tokenizer as (encoder, merges in rank order): what Tokenizer takes, without the weights."""
    s = sql.Identifier(name)
    encoder = {piece: i for i, piece in conn.execute(sql.SQL("SELECT id, piece FROM {}.tokens").format(s))}
    pieces = {i: p for p, i in encoder.items()}
    merges = [(pieces[a], pieces[b])
              for a, b in conn.execute(sql.SQL("SELECT a, b FROM {}.merges ORDER BY rank").format(s))]
    return encoder, merges


def read_model(conn: psycopg.Connection, name: str) -> Checkpoint:
    """Read a loaded model's tables back into a Checkpoint, so the NumPy reference runs the very same weights."""
    from pgvector.psycopg import register_vector

    register_vector(conn)
    s = sql.Identifier(name)

    def q(query: str) -> list[tuple]:
        return [tuple(v.to_numpy() if hasattr(v, "to_numpy") else v for v in row)
                for row in conn.execute(sql.SQL(query).format(s=s)).fetchall()]

    n_vocab, n_ctx, n_embd, n_head, n_layer, source, dtype = q(
        "SELECT n_vocab, n_ctx, n_embd, n_head, n_layer, source, coalesce(to_jsonb(h) ->> 'dtype', 'float32')"
        " FROM {s}.hparams h")[0]
    hp = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    encoder, merges = read_vocabulary(conn, name)

    def stack(query: str) -> np.ndarray:
        return np.stack([r[0] for r in q(query)]).astype(np.float32)

    params = {"wte": stack("SELECT w FROM {s}.wte ORDER BY id"), "wpe": stack("SELECT w FROM {s}.wpe ORDER BY pos")}
    for i in range(n_layer):
        for ln in ("ln_1", "ln_2"):
            g, b = q(f"SELECT g, b FROM {{s}}.{ln} WHERE layer = {i}")[0]
            params[f"h.{i}.{ln}.g"], params[f"h.{i}.{ln}.b"] = g, b
        for table, pname in (("attn_c_attn", "attn.c_attn"), ("attn_c_proj", "attn.c_proj"), ("mlp_c_fc", "mlp.c_fc")):
            rows = q(f"SELECT w, b FROM {{s}}.{table} WHERE layer = {i} ORDER BY col")
            params[f"h.{i}.{pname}.w"] = np.stack([w for w, _ in rows]).T.astype(np.float32)
            params[f"h.{i}.{pname}.b"] = np.array([b for _, b in rows], dtype=np.float32)
        rows = q(f"SELECT col, chunk, w, b FROM {{s}}.mlp_c_proj WHERE layer = {i} ORDER BY chunk, col")
        w = np.zeros((4 * n_embd, n_embd), dtype=np.float32)
        bias = np.zeros(n_embd, dtype=np.float32)
        for col, chunk, wc, b in rows:  # chunks of any width (older loads: n_embd)
            w[chunk * len(wc):(chunk + 1) * len(wc), col] = wc
            bias[col] += b
        params[f"h.{i}.mlp.c_proj.w"], params[f"h.{i}.mlp.c_proj.b"] = w, bias
    params["ln_f.g"], params["ln_f.b"] = q("SELECT g, b FROM {s}.ln_f")[0]
    return validate(Checkpoint(hp, encoder, merges, params, source=f"{source} (read back from {name})",
                               dtype=dtype))
