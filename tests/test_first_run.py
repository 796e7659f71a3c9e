"""A fresh machine: with nothing loaded, `gpt-sql run` loads GPT-2 124M from the download cache, or offline with
nothing cached the bundled model, by itself, and says which. Each test has a data dir of its own (a new embedded
server, no models), not the session's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from gpt_sql.runner.engine import NumpyEngine, Params
from gpt_sql.runner.firstrun import BUNDLED, bundled_path

needs_bundled = pytest.mark.skipif(not (bundled_path() / "config.json").exists(),
                                   reason="the bundled model (loader/models/shakespeare-mini) is not in this checkout")


def fresh_machine(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """`gpt-sql ARGS` as a subprocess on a machine of its own under tmp_path, with no network."""
    env = {**os.environ,
           "GPT_SQL_DATA": str(tmp_path / "data"),        # an empty data dir: a new embedded server, no models
           "GPT_SQL_CACHE": str(tmp_path / "cache"),      # the download cache (empty unless the test fills it)
           "GPT_SQL_DOWNLOAD_URL": "http://127.0.0.1:9"}  # and no network: a closed port refuses at once

    def gpt_sql(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    return gpt_sql


def test_first_run_takes_gpt2_124m_from_the_download_cache(tmp_path):
    """A checkpoint in OpenAI's format where `gpt-sql download 124M` puts it (GPT_SQL_CACHE/124M): `run` loads it as
    gpt2_124m, not the bundled model, says so, and generates what NumPy generates on those weights."""
    from test_checkpoint_formats import write_openai_py  # OpenAI's layout; the bundle agrees with TensorFlow's
    from tiny import make_checkpoint

    ckpt = make_checkpoint(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=17)
    cached = tmp_path / "cache" / "124M"
    write_openai_py(ckpt, cached)
    gpt_sql = fresh_machine(tmp_path)
    args = ("run", "Happy New Year!", "--tokens", "8", "--seed", "3")
    want = [t.token for t in NumpyEngine(ckpt).generate(Params("Happy New Year!", 8, 1.0, 5, 3))]
    try:
        r = gpt_sql(*args)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "Happy New Year!" + NumpyEngine(ckpt).tokenizer.decode(want) + "\n"
        assert f"gpt-sql: no model loaded; loading GPT-2 124M from {cached}" in r.stderr.splitlines(), r.stderr
        assert BUNDLED not in r.stderr and "Traceback" not in r.stderr
        models = gpt_sql("models", "--json")
        assert models.returncode == 0, models.stderr
        assert [(m["name"], m["source"], m["n_params"]) for m in json.loads(models.stdout)] == \
            [("gpt2_124m", str(cached), ckpt.n_params)]
        # the next run finds it loaded: no notice, the same tokens
        again = gpt_sql(*args, "--json")
        assert again.returncode == 0 and "no model loaded" not in again.stderr, again.stderr
        assert json.loads(again.stdout)["tokens"] == want
    finally:
        gpt_sql("server", "stop")


@needs_bundled
def test_offline_first_run_uses_bundled_model(tmp_path):
    gpt_sql = fresh_machine(tmp_path)
    try:
        r = gpt_sql("run", "Happy New Year!", "--tokens", "12", "--seed", "1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("Happy New Year!") and len(r.stdout) > len("Happy New Year!\n")
        notice = [line for line in r.stderr.splitlines() if BUNDLED in line]
        assert notice and "gpt-sql download 124M" in notice[0], r.stderr
        assert "Traceback" not in r.stderr
        # the second run finds the model loaded: no notice, same seed, same text
        again = gpt_sql("run", "Happy New Year!", "--tokens", "12", "--seed", "1")
        assert again.returncode == 0 and again.stdout == r.stdout and BUNDLED not in again.stderr
        models = gpt_sql("models")
        assert BUNDLED in models.stdout
    finally:
        gpt_sql("server", "stop")
