"""The embedded server's shared_buffers follow the loaded models, within the machine's memory."""

from __future__ import annotations

from gpt_sql.runner.db import MB, shared_buffers_mb
from test_cli import gpt_sql

GB = 1024 * MB


def test_sizing_holds_the_models_within_half_the_memory():
    assert shared_buffers_mb(0, 24 * GB) == 1024                      # at least 1 GB
    assert shared_buffers_mb(651 * MB, 24 * GB) == 1024               # 124M fp32 fits the minimum
    assert shared_buffers_mb(2733 * MB, 24 * GB) == 3584              # 355M fp32: 2.7 GB * 1.25 + 128 MB
    assert shared_buffers_mb(3860 * MB, 24 * GB) == 5120              # 1558M fp16
    assert shared_buffers_mb(8000 * MB, 24 * GB) == 10240             # 8 GB of models
    assert shared_buffers_mb(12000 * MB, 24 * GB) == 12 * 1024        # capped at half the memory
    assert shared_buffers_mb(8000 * MB, 8 * GB) == 4 * 1024
    assert shared_buffers_mb(100 * GB, 1 * GB) == 1024                # a tiny machine still gets the minimum
    for size in (0, 300 * MB, 5 * GB, 50 * GB):
        assert shared_buffers_mb(size, 24 * GB) % 256 == 0


def test_status_shows_shared_buffers_and_why(dsn):
    r = gpt_sql("server", "status")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("shared_buffers:"))
    assert "MB" in line and "loaded models" in line and "machine" in line
