"""The loader streams a checkpoint into COPY a tensor at a time: open_checkpoint reads no tensor, and a load holds
about one layer's matrix, not the checkpoint. Memory is measured with tracemalloc (numpy reports its arrays to
it), so the bounds are deterministic: no timing, no RSS noise."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt_sql.loader.checkpoint import CheckpointError, LazyParams, as_dtype, open_checkpoint, read_checkpoint
from gpt_sql.loader.hf_format import write_hf
from gpt_sql.loader.load import load, weight_rows
from gpt_sql.loader.unicode_classes import class_ranges
from gpt_sql.runner.models import read_model
from test_checkpoint_formats import write_openai_py
from test_cli import gpt_sql
from tiny import make_checkpoint

# 24 layers of 128: 19 MB of float32 weights, the largest tensor 0.26 MB (a layer's MLP matrix)
SHAPE = dict(n_embd=128, n_head=4, n_layer=24, n_ctx=64)
LAST = f"h.{SHAPE['n_layer'] - 1}.mlp.c_proj"  # the last matrix of the last layer


def write(fmt: str, ckpt, d: Path) -> Path:
    if fmt == "openai":
        write_openai_py(ckpt, d)
    else:
        write_hf(ckpt, d, dtype="float16" if fmt == "hf-fp16" else "float32")
    return d


def peak_traced(fn: Callable[[], object]) -> int:
    """The most memory Python and numpy held at once while `fn` ran, above what they held before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def ckpt():
    return make_checkpoint(**SHAPE, seed=31)


@pytest.mark.parametrize("fmt", ["hf", "hf-fp16", "openai"])
def test_weight_rows_hold_a_tensor_at_a_time(ckpt, tmp_path, fmt):
    d = write(fmt, ckpt, tmp_path)
    total = ckpt.n_params * 4
    opened = open_checkpoint(d)
    assert isinstance(opened.params, LazyParams)

    def stream() -> None:
        for _, _, rows in weight_rows(opened):
            for _ in rows:
                pass

    streamed = peak_traced(stream)
    whole = peak_traced(lambda: read_checkpoint(d))
    assert whole >= total                      # reading whole holds every tensor
    assert streamed < total / 16, (streamed, total)  # streaming: about one layer (1/24 of the weights) at most


def test_open_checkpoint_reads_no_tensor(ckpt, tmp_path):
    """A NaN in the last layer's last matrix is found when that tensor is read, not when the checkpoint opens."""
    write_hf(ckpt, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[LAST + ".weight"][3, 5] = np.nan
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    opened = open_checkpoint(tmp_path)  # no error: nothing read yet
    np.testing.assert_array_equal(opened.params["wte"], ckpt.params["wte"])
    with pytest.raises(CheckpointError, match=f"tensor {LAST}.w holds NaN"):
        opened.params[LAST + ".w"]


@pytest.mark.parametrize("fmt,dtype", [("hf", "float32"), ("hf-fp16", "float32"), ("openai", "float32"),
                                       ("hf", "float16")])
def test_a_streamed_load_holds_little_and_stores_the_checkpoint(conn, ckpt, tmp_path, fmt, dtype):
    d = write(fmt, ckpt, tmp_path)
    name = f"lazy_{fmt.replace('-', '_')}_{dtype}"
    class_ranges()  # the tokenizer's Unicode table: computed once per process, whatever the checkpoint
    peak = peak_traced(lambda: load(conn, as_dtype(open_checkpoint(d), dtype), name, progress=False))
    assert peak < ckpt.n_params * 4 / 4, peak  # the COPY of a whole table never holds the table
    back, want = read_model(conn, name), as_dtype(read_checkpoint(d), dtype)
    assert back.dtype == dtype
    for k, a in want.params.items():
        np.testing.assert_array_equal(back.params[k], a, err_msg=k)


def test_a_bad_tensor_late_in_the_file_fails_the_load_in_one_line_and_keeps_the_old_version(conn, ckpt, tmp_path):
    """The tensors are checked as they are copied, inside the load's transaction: a NaN found in the last layer
    rolls everything back."""
    write_hf(ckpt, tmp_path / "good")
    r = gpt_sql("load", str(tmp_path / "good"), "--name", "late_nan")
    assert r.returncode == 0, r.stderr
    other = make_checkpoint(**SHAPE, seed=32)
    write_hf(other, tmp_path / "bad")
    tensors = load_file(str(tmp_path / "bad" / "model.safetensors"))
    tensors[LAST + ".weight"][0, 0] = np.inf
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    r = gpt_sql("load", str(tmp_path / "bad"), "--name", "late_nan")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"tensor {LAST}.w holds NaN or infinite values" in r.stderr
    back = read_model(conn, "late_nan")
    for k, a in ckpt.params.items():
        np.testing.assert_array_equal(back.params[k], a, err_msg=k)
    assert not conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'late_nan__loading'").fetchone()[0]
