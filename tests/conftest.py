"""One real embedded PostgreSQL (with pgvector) for the whole test session, in a private data dir."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never touch the user's real data dir or download cache: everything lives under one temp dir,
# and the CLI, run in-process or as a subprocess, finds the same server through GPT_SQL_DATA.
_TMP = Path(tempfile.mkdtemp(prefix="gpt-sql-tests-"))
os.environ["GPT_SQL_DATA"] = str(_TMP / "data")
os.environ["GPT_SQL_CACHE"] = str(_TMP / "cache")
for var in ("DATABASE_URL", "PGHOST", "PGDATABASE", "PGPORT", "PGUSER"):
    os.environ.pop(var, None)


# .ci/run installs every optional package and locale the tests use, so there a missing one is a broken install,
# not a reason to skip: under CI=true the tests that would skip fail instead.
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def missing(reason: str) -> NoReturn:
    """Skip the test (or the whole module, at import) because a prerequisite is absent; fail under CI=true."""
    if IN_CI:
        pytest.fail(f"CI=true, yet {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, reason: str) -> ModuleType:
    """pytest.importorskip, but a failure under CI=true: tests that need torch, transformers, tensorflow or another
    optional package import it through this."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{reason} ({e})")


def pytest_sessionfinish(session, exitstatus) -> None:
    """The session's server is stopped by then (the dsn fixture's teardown): remove its data dir and caches, a GB
    or more per run otherwise left in the temp dir."""
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def dsn() -> str:
    from gpt_sql.runner.db import embedded_uri, stop_embedded

    uri = embedded_uri(start=True)
    yield uri
    stop_embedded()


@pytest.fixture(scope="session")
def conn(dsn):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


_loaded: dict[tuple, object] = {}


@pytest.fixture(scope="session")
def load_tiny(conn):
    """load_tiny(name, dtype="float32", **shape) -> Checkpoint: a tiny random GPT-2, loaded once per session under
    `name` with its matrices stored in `dtype`."""
    from tiny import make_checkpoint
    from gpt_sql.loader.checkpoint import as_dtype
    from gpt_sql.loader.load import load

    def _load(name: str, dtype: str = "float32", **kw):
        key = (name, dtype, tuple(sorted(kw.items())))
        if key not in _loaded:
            ckpt = as_dtype(make_checkpoint(**kw), dtype)
            load(conn, ckpt, name, progress=False)
            _loaded[key] = ckpt
        return _loaded[key]

    return _load


def shared_gpt2_available() -> bool:
    from tiny import SHARED_GPT2

    return (SHARED_GPT2 / "encoder.json").exists() and (SHARED_GPT2 / "vocab.bpe").exists()


needs_shared_gpt2 = pytest.mark.skipif(not shared_gpt2_available(),
                                       reason="../shared/gpt2 (OpenAI's GPT-2 tokenizer files) is not present")
