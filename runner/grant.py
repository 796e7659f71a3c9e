"""`gpt-sql grant`: read-only use of model schemas for a role that may run generations and nothing else.

What the query needs: USAGE on the model's schema and on `public` (pgvector's type, operators and functions),
SELECT on the model's tables, EXECUTE on its functions (PostgreSQL grants EXECUTE to PUBLIC by default; granted
anyway, so a REVOKE from PUBLIC does not break it). Setting `gpt.*`, `work_mem`, `jit`, `statement_timeout` with
set_config needs no privilege. The role gets no CREATE anywhere, so it cannot load, replace or drop a model.

A load builds `NAME__loading` and renames it over NAME, so privileges on the old objects would vanish with them:
the loader copies the replaced schema's privileges onto the new one (loader/load.py, copy_privileges). Models
loaded later under a new name are not covered unless `future` is set: ALTER DEFAULT PRIVILEGES for the role that
runs this (without IN SCHEMA, the only form that reaches a schema created later), which makes every schema, table
and function that role creates in this database readable by the grantee, models or not.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from .models import ModelError, model_names


class GrantError(Exception):
    """The role is missing, or already exists with --create."""


def grant(conn: psycopg.Connection, role: str, models: list[str] | None = None, create: bool = False,
          login: bool = False, future: bool = False) -> list[str]:
    """Grant `role` read-only use of `models` (default: every loaded model), in one transaction. Returns them."""
    loaded = model_names(conn)
    if models:
        missing = [m for m in models if m not in loaded]
        if missing:
            have = ", ".join(loaded) if loaded else "none"
            raise ModelError(f"model {missing[0]!r} is not loaded (loaded: {have})")
    else:
        models = loaded
    r = sql.Identifier(role)
    with conn.transaction():
        exists = conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None
        if create:
            if exists:
                raise GrantError(f"role {role!r} already exists; leave out --create to grant it")
            conn.execute(sql.SQL("CREATE ROLE {} {}").format(r, sql.SQL("LOGIN" if login else "NOLOGIN")))
        elif not exists:
            raise GrantError(f"role {role!r} does not exist; add --create (and --login for a role that connects)")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(r))
        for name in dict.fromkeys(models):
            s = sql.Identifier(name)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r))
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r))
            conn.execute(sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {} TO {}").format(s, r))
        if future:
            for what, privilege in (("SCHEMAS", "USAGE"), ("TABLES", "SELECT"), ("FUNCTIONS", "EXECUTE")):
                conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES GRANT {} ON {} TO {}").format(
                    sql.SQL(privilege), sql.SQL(what), r))
    return list(dict.fromkeys(models))
