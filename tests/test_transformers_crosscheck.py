"""An independent cross-check: the SQL query's next-token probabilities against Hugging Face transformers'
GPT2LMHeadModel (PyTorch, CPU, fp32) on the same random checkpoint in Hugging Face format."""

from __future__ import annotations

import numpy as np
import pytest

from gpt_sql.loader.checkpoint import read_checkpoint
from gpt_sql.loader.hf_format import write_hf
from gpt_sql.loader.load import load
from gpt_sql.runner.engine import NumpyEngine, next_sql
from tiny import make_checkpoint

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

SHAPES = [dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=31), dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=32)]
PROMPTS = ["Happy New Year!", "I wish you a happy New", "x", "don't STOP: it's 2026 🙂", ""]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"embd{s['n_embd']}-layers{s['n_layer']}")
def test_sql_probabilities_equal_transformers(conn, tmp_path, shape):
    write_hf(make_checkpoint(**shape, scale=0.1), tmp_path)
    ckpt = read_checkpoint(tmp_path)  # what gpt-sql load reads from the directory transformers reads too
    name = f"hf_x{shape['n_embd']}"
    load(conn, ckpt, name, progress=False)
    # .float() rather than torch_dtype=, which transformers 5 deprecates (its default dtype there is the config's)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).float().eval()
    eng = NumpyEngine(ckpt)
    n_vocab, worst = ckpt.hparams["n_vocab"], 0.0
    for prompt in PROMPTS:
        ids = eng.encode(prompt)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        p_hf = torch.softmax(logits, dim=-1).numpy()
        got = next_sql(conn, name, prompt, n_vocab, 1.0)
        assert len(got) == n_vocab
        p_sql = np.zeros(n_vocab)
        p_sql[[t.token for t in got]] = [t.prob for t in got]
        worst = max(worst, float(np.abs(p_sql - p_hf).max()))
    assert worst <= 1e-5, worst
    print(f"max |p_sql - p_transformers| = {worst:.2e}")
