"""Choosing a model when the user named none: a loaded one, GPT-2 124M (cached or downloaded), else the bundled one."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import psycopg

from ..loader.checkpoint import open_checkpoint
from ..loader.load import load
from .models import ModelError, model_names, resolve_model

BUNDLED = "shakespeare_mini"


def bundled_path() -> Path:
    return Path(str(resources.files("gpt_sql.loader").joinpath("models", "shakespeare-mini")))


def notice(message: str) -> None:
    print(f"gpt-sql: {message}", file=sys.stderr)


def choose_model(conn: psycopg.Connection, name: str | None) -> tuple[str, bool]:
    """--model; a loaded model; GPT-2 124M from the download cache; a download; the bundled model. Never silent.
    Returns the model and whether it was loaded just now."""
    if name or model_names(conn):
        return resolve_model(conn, name), False
    from ..loader.download import DownloadError, default_cache_dir, download

    cached = default_cache_dir() / "124M"
    if (cached / "model.ckpt.index").exists():
        notice(f"no model loaded; loading GPT-2 124M from {cached}")
        load(conn, open_checkpoint(cached), "gpt2_124m")
        return "gpt2_124m", True
    try:
        path = download("124M", default_cache_dir(), progress=sys.stderr.isatty())
    except DownloadError as e:
        reason = str(e)
    else:
        notice("no model loaded; downloaded GPT-2 124M, loading it")
        load(conn, open_checkpoint(path), "gpt2_124m")
        return "gpt2_124m", True
    if not (bundled_path() / "config.json").exists():
        raise ModelError(f"no model is loaded and GPT-2 could not be downloaded ({reason})")
    notice(f"no model loaded and GPT-2 is not available offline; using the bundled {BUNDLED} "
           "(a small model trained on Shakespeare). For GPT-2: `gpt-sql download 124M` where there is a network, "
           "or `gpt-sql load DIR`.")
    load(conn, open_checkpoint(bundled_path()), BUNDLED)
    return BUNDLED, True
