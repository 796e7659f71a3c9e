"""fp16 weights: `gpt-sql load --dtype float16` stores the matrices as halfvec, and every command runs on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt_sql.loader.checkpoint import CheckpointError, as_dtype, is_matrix
from gpt_sql.loader.hf_format import write_hf
from gpt_sql.runner.engine import NumpyEngine, Params
from test_cli import TINY, gpt_sql
from tiny import make_checkpoint

MATRICES = ("wte", "wpe", "attn_c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The same tiny checkpoint loaded twice by the CLI: as fp32 (f32_cli) and as fp16 (f16_cli)."""
    d = tmp_path_factory.mktemp("ckpt")
    ckpt = make_checkpoint(**TINY)
    write_hf(ckpt, d)
    for name, dtype in (("f32_cli", "float32"), ("f16_cli", "float16")):
        r = gpt_sql("load", str(d), "--name", name, "--dtype", dtype)
        assert r.returncode == 0, r.stderr
        assert f"({dtype})" in r.stdout
    return ckpt


def test_matrices_are_halfvec_and_the_rest_fp32(conn, loaded):
    types = dict(conn.execute("SELECT table_name, udt_name FROM information_schema.columns"
                              " WHERE table_schema = 'f16_cli' AND column_name IN ('w', 'g')").fetchall())
    assert {t: types[t] for t in MATRICES} == {t: "halfvec" for t in MATRICES}
    assert types["ln_1"] == types["ln_f"] == "vector"
    storage = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = ANY(%s::regclass[])"
                           " AND attname = 'w' AND attstorage <> 'p'", ([f"f16_cli.{t}" for t in MATRICES],))
    assert storage.fetchone()[0] == 0  # stored inline, as the fp32 tables
    assert conn.execute("SELECT dtype FROM f16_cli.hparams").fetchone()[0] == "float16"


def test_models_shows_dtype_and_a_smaller_size(loaded):
    r = gpt_sql("models", "--json")
    assert r.returncode == 0, r.stderr
    models = {m["name"]: m for m in json.loads(r.stdout)}
    assert (models["f32_cli"]["dtype"], models["f16_cli"]["dtype"]) == ("float32", "float16")
    assert models["f16_cli"]["n_params"] == models["f32_cli"]["n_params"]
    assert models["f16_cli"]["size_bytes"] < models["f32_cli"]["size_bytes"]
    table = gpt_sql("models")
    assert table.returncode == 0 and "float16" in table.stdout


def test_weights_read_back_are_the_rounded_ones(conn, loaded):
    """What the NumPy engine reads back from an fp16 model is exactly the checkpoint rounded to fp16."""
    from gpt_sql.runner.models import read_model

    back = read_model(conn, "f16_cli")
    rounded = as_dtype(loaded, "float16")
    assert back.dtype == "float16"
    for name, a in rounded.params.items():
        np.testing.assert_array_equal(back.params[name], a, err_msg=name)
    assert any(not np.array_equal(rounded.params[k], loaded.params[k]) for k in loaded.params if is_matrix(k))


@pytest.mark.parametrize("schema, dtype", [("f32_cli", "float32"), ("f16_cli", "float16")])
def test_weight_rows_fill_pages_in_scan_order(conn, loaded, schema, dtype):
    """wte's and the linears' rows fill each heap page (as many as rows_per_page says), and a page's rows in the
    order the query scans them lie in ascending memory: PostgreSQL fills a page from its end, so the loader writes
    each page's rows in reverse, and the last line pointer of a page is its first row."""
    from gpt_sql.loader.load import LINEAR_TYPES, MATRICES, rows_per_page

    tables = {"wte": ("id", ["int4", "vector"], "")}
    tables.update({t: ("layer, chunk, col", LINEAR_TYPES, m) for t, m in MATRICES.items()})
    for table, (key, types, matrix) in tables.items():
        rows = conn.execute(f"SELECT (ctid::text::point)[0]::int, (ctid::text::point)[1]::int, vector_dims(w)"
                            f" FROM {schema}.{table} ORDER BY {key}").fetchall()
        pages: dict[int, list[int]] = {}
        for page, item, _ in rows:
            pages.setdefault(page, []).append(item)
        full = rows_per_page(types, rows[0][2], dtype, matrix)
        assert sorted(len(items) for items in pages.values())[1:] == [full] * (len(pages) - 1), table
        assert list(pages) == sorted(pages), table  # pages in order...
        assert all(items == sorted(items, reverse=True) for items in pages.values()), table  # ...rows reversed in each


def test_run_on_fp16_agrees_with_the_numpy_engine(loaded):
    args = ("run", "Happy New Year!", "--model", "f16_cli", "--tokens", "8", "--top-n", "1", "--json")
    r = gpt_sql(*args)
    assert r.returncode == 0, r.stderr
    n = gpt_sql(*args, "--engine", "numpy")
    assert n.returncode == 0, n.stderr
    assert json.loads(r.stdout)["tokens"] == json.loads(n.stdout)["tokens"]
    eng = NumpyEngine(as_dtype(loaded, "float16"))
    assert json.loads(n.stdout)["tokens"] == [t.token for t in eng.generate(Params("Happy New Year!", 8, 1.0, 1, 0))]


def test_bad_dtype_and_out_of_range_weights_are_refused(tmp_path):
    r = gpt_sql("load", str(tmp_path), "--dtype", "bfloat16")
    assert r.returncode != 0 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    ckpt = make_checkpoint(**TINY)
    ckpt.params["wte"][0, 0] = 1e5  # beyond fp16's largest finite value
    with pytest.raises(CheckpointError, match="float16's range"):
        as_dtype(ckpt, "float16")
    write_hf(ckpt, tmp_path)
    r = gpt_sql("load", str(tmp_path), "--name", "f16_bad", "--dtype", "float16")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "float16's range" in r.stderr


@pytest.mark.parametrize("name, missing", [("old_tiny", "FUNCTION {}.as_weights(vector)"),
                                           ("older_tiny", "TYPE {}.head_cache")])
def test_a_model_loaded_by_an_older_version_says_to_reload(conn, load_tiny, name, missing):
    """The query's helpers (as_weights, columns_of) and its cache's type live in each model's schema; without
    one of them, one line."""
    from gpt_sql.runner.engine import GenerationError, generate_sql

    load_tiny(name, **TINY)
    conn.execute(f"DROP {missing.format(name)} CASCADE")
    with pytest.raises(GenerationError, match="loaded by an older gpt-sql .* load it again"):
        list(generate_sql(conn, name, Params("Happy New Year!", tokens=2)))
