"""A fresh machine with no network: `gpt-sql run` loads the bundled model by itself and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpt_sql.runner.firstrun import BUNDLED, bundled_path

pytestmark = pytest.mark.skipif(not (bundled_path() / "config.json").exists(),
                                reason="the bundled model (loader/models/shakespeare-mini) is not in this checkout")


def test_offline_first_run_uses_bundled_model(tmp_path):
    env = {**os.environ,
           "GPT_SQL_DATA": str(tmp_path / "data"),        # an empty data dir: a new embedded server, no models
           "GPT_SQL_CACHE": str(tmp_path / "cache"),      # no GPT-2 in the download cache
           "GPT_SQL_DOWNLOAD_URL": "http://127.0.0.1:9"}  # and no network: a closed port refuses at once

    def gpt_sql(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", *args], capture_output=True, text=True,
                              env=env, timeout=300)

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
