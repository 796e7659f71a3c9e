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


def test_a_load_that_cannot_fit_is_refused_before_reading():
    import pytest

    from gpt_sql.loader.checkpoint import CheckpointError, check_room, room_needed

    xl = dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48)
    memory, disk = room_needed(xl, "float32")
    assert 6 * GB < memory < 9 * GB and 7 * GB < disk < 8.5 * GB  # 1.56 B weights: 6.2 GB, 1 row a page
    assert room_needed(xl, "float16")[1] < disk / 1.8                 # halfvec: two rows a page, 2 bytes a weight
    check_room(xl, "float32", free_memory=16 * GB, free_disk=20 * GB)  # fits: no error
    check_room(xl, "float32", free_memory=16 * GB, free_disk=None)     # a remote server's disk is not ours to know
    with pytest.raises(CheckpointError, match=r"needs about 7\.\d GB of memory .* 4\.0 GB is available"):
        check_room(xl, "float32", free_memory=4 * GB, free_disk=20 * GB)
    with pytest.raises(CheckpointError, match=r"takes about 7\.\d GB in the database .* 2\.0 GB of disk is free"):
        check_room(xl, "float32", free_memory=16 * GB, free_disk=2 * GB)
