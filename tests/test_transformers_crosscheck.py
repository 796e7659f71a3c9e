"""An independent cross-check: the SQL query's log-probabilities (after the prompt and at KV-cache decode steps),
scores, perplexities, embeddings and fp16 drift against Hugging Face transformers' GPT2LMHeadModel (PyTorch, CPU) on
the same random checkpoint in Hugging Face format.

The NumPy reference (runner/reference.py) is the SQL's twin, written from the same reading of GPT-2; transformers is
not. So these comparisons are the suite's check of the arithmetic itself, and their bounds are set to catch the
classic porting mistakes: an erf GELU for GPT-2's tanh one, layer norm's epsilon 1e-6 for 1e-5, a KV-cache position
off by one. Each bound is about 3x the float32 noise measured here; each of those mistakes, made in sql/ alone, moves
the figures it touches 25x to 10^5x beyond their bounds (the figures in the note on issue 36).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpt_sql.loader.checkpoint import Checkpoint, as_dtype, read_checkpoint
from gpt_sql.loader.hf_format import write_hf
from gpt_sql.loader.load import load
from gpt_sql.runner.engine import NumpyEngine
from conftest import require
from tiny import make_checkpoint

torch = require("torch", "torch is not installed (pip install torch==2.13.0)")
transformers = require("transformers", "transformers is not installed (pip install transformers)")

# Bounds, each about 3x the largest difference measured on this machine over both shapes (python -m pytest -s
# tests/test_transformers_crosscheck.py prints them). transformers computes in float64, the exact answer to within
# 1e-12 here, so a difference is the SQL's own float32 rounding.
# Log-probabilities over the whole vocabulary, after the prompt and at decode steps; score's, and ln perplexity.
# Measured: 6.2e-6 after the prompt, 7.2e-6 at decode steps, score 3.4e-6, ln perplexity 1.3e-6 (transformers' own
# float32 is 1.6e-5 from its float64 on the same checkpoints)
LOGPROB_TOL = 2e-5
# embed's vector, as a fraction of its largest element (ln_f's gain makes the final one's scale unlike the blocks').
# Measured: 3.2e-7
EMBED_TOL = 1e-6
# fp16 weights (activations rounded to fp16 where they meet them) against the fp32 checkpoint's exact answer.
# Measured: 1.7e-2 after the prompt, 1.8e-2 at decode steps. Expected of that order: fp16 keeps 11 bits, a unit
# roundoff of 2^-11 = 4.9e-4 relative, and these logits span about 34, so 2^-11 x 34 = 1.7e-2; rounding the weights
# alone (transformers in float64 on the fp16-rounded checkpoint) moves them by 1.6e-2. The bound allows 2.3x
FP16_LOGPROB_TOL = 4e-2
# Sharp distributions, where a small shift of the logits shows in the log-probabilities: the likeliest token at
# every compared step at least this many times as likely as a uniform draw. Measured: at least 79x (top probability
# 0.18 or more), against 3.6x at the checkpoint scale 0.1 alone
MIN_PEAK_OVER_UNIFORM = 10

SHAPES = [dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=31),
          dict(n_embd=48, n_head=4, n_layer=3, n_ctx=96, seed=32)]
LN_F_GAIN = 8.0  # ln_f's gain scaled up: sharp logits while the residual stream stays small (layer norm's eps matters)
PROMPTS = ["Happy New Year!", "I wish you a happy New", "x", "don't STOP: it's 2026 🙂", ""]
STEPS = 6  # greedy steps per prompt: the first after the prompt, the rest decode steps reading the KV cache
TEXTS = ["Happy New Year!", "The quick brown fox jumps over the lazy dog; the dog doesn't mind.", "x"]


def sharp_checkpoint(shape: dict) -> Checkpoint:
    ckpt = make_checkpoint(**shape, scale=0.1)
    ckpt.params["ln_f.g"] = (ckpt.params["ln_f.g"] * LN_F_GAIN).astype(np.float32)
    return ckpt


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"embd{s['n_embd']}-layers{s['n_layer']}")
def models(request, conn, tmp_path_factory):
    """One fp32 checkpoint as transformers reads it and as gpt-sql loads it from the same directory, in fp32 and
    in fp16: (schema fp32, schema fp16, checkpoint, transformers model in float64)."""
    shape = request.param
    d = tmp_path_factory.mktemp("hf")
    write_hf(sharp_checkpoint(shape), d)
    ckpt = read_checkpoint(d)  # what gpt-sql load reads from the directory transformers reads too
    name = f"hf_x{shape['n_embd']}"
    load(conn, ckpt, name, progress=False)
    load(conn, as_dtype(ckpt, "float16"), f"{name}_f16", progress=False)
    # .double() rather than torch_dtype=, which transformers 5 deprecates (its default dtype there is the config's)
    hf = transformers.GPT2LMHeadModel.from_pretrained(d).double().eval()
    return name, f"{name}_f16", ckpt, hf


def hf_logprobs(hf, ids: list[int]) -> np.ndarray:
    """log softmax of transformers' logits at every position of ids (a full forward, no cache)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1).numpy()


def sql_greedy_logprobs(conn, model: str, prompt: str, n_vocab: int) -> list[tuple[int, np.ndarray]]:
    """Greedy generation's steps in SQL (the model's generate function), each its token and the log-probability of
    every token of the vocabulary (logprobs = n_vocab lists them all)."""
    rows = conn.execute(f"SELECT step, token, alternatives FROM {model}.generate(%s, %s, 1, 1, 0, NULL, 1, %s)"
                        " ORDER BY step", (prompt, STEPS, n_vocab)).fetchall()
    steps = []
    for _, token, alternatives in rows:
        lp = np.full(n_vocab, np.nan)
        lp[[a["token"] for a in alternatives]] = [a["logprob"] for a in alternatives]
        assert not np.isnan(lp).any(), "logprobs = n_vocab should list every token"
        steps.append((token, lp))
    return steps


def logprob_differences(conn, model: str, ckpt: Checkpoint, hf) -> tuple[float, float, int]:
    """The largest |SQL - transformers| log-probability over the vocabulary after the prompts (step 1) and at the
    decode steps after, and how many decode steps were compared; checks each step's distribution is sharp."""
    eng, n_vocab = NumpyEngine(ckpt), ckpt.hparams["n_vocab"]
    after_prompt, decode, n_decode = 0.0, 0.0, 0
    for prompt in PROMPTS:
        ids = eng.encode(prompt)
        steps = sql_greedy_logprobs(conn, model, prompt, n_vocab)
        full = hf_logprobs(hf, ids + [token for token, _ in steps[:-1]])
        for k, (_, lp) in enumerate(steps):
            want = full[len(ids) - 1 + k]
            assert math.exp(want.max()) >= MIN_PEAK_OVER_UNIFORM / n_vocab, (
                f"{model} {prompt!r} step {k + 1}: flat distribution, top probability {math.exp(want.max()):.4f}")
            diff = float(np.abs(lp - want).max())
            if k == 0:
                after_prompt = max(after_prompt, diff)
            else:
                decode, n_decode = max(decode, diff), n_decode + 1
    return after_prompt, decode, n_decode


def test_logprobs_after_the_prompt_and_at_decode_steps(conn, models):
    name, _, ckpt, hf = models
    after_prompt, decode, n_decode = logprob_differences(conn, name, ckpt, hf)
    print(f"\n{name}: max |logprob_sql - logprob_transformers| after the prompt {after_prompt:.2e}, at {n_decode} "
          f"decode steps {decode:.2e}")
    assert n_decode >= 2 * len(PROMPTS), n_decode  # the cache was read, not only the prompt's step
    assert after_prompt <= LOGPROB_TOL, f"after the prompt: {after_prompt:.3e}"
    assert decode <= LOGPROB_TOL, f"at decode steps (KV cache): {decode:.3e}"


def test_score_and_perplexity(conn, models):
    name, _, ckpt, hf = models
    eng = NumpyEngine(ckpt)
    eot = ckpt.encoder["<|endoftext|>"]
    worst_lp, worst_ppl = 0.0, 0.0
    for text in TEXTS:
        ids = [eot] + eng.encode(text)
        full = hf_logprobs(hf, ids)
        want = full[np.arange(len(ids) - 1), ids[1:]]
        got = conn.execute(f"SELECT token, logprob FROM {name}.score(%s) ORDER BY pos", (text,)).fetchall()
        assert [t for t, _ in got] == ids[1:]
        worst_lp = max(worst_lp, float(np.abs(np.array([lp for _, lp in got]) - want).max()))
        (ppl,), = conn.execute(f"SELECT {name}.perplexity(%s)", (text,)).fetchall()
        # perplexity = exp(-mean logprob): compared as its log, which the log-probabilities' bound covers
        worst_ppl = max(worst_ppl, abs(math.log(ppl) - float(-want.mean())))
    print(f"\n{name}: max |score_sql - transformers| {worst_lp:.2e}, |ln perplexity| {worst_ppl:.2e}")
    assert worst_lp <= LOGPROB_TOL, f"score: {worst_lp:.3e}"
    assert worst_ppl <= LOGPROB_TOL, f"ln perplexity: {worst_ppl:.3e}"


def hf_embeddings(hf, ids: list[int], n_layer: int) -> dict[int | None, np.ndarray]:
    """What embed gives, from transformers: the mean over positions of the stream after ln_f (None) and after each
    block k. In transformers 5 hidden_states[k + 1] is block k's output but the last, which is replaced by the
    output after ln_f (last_hidden_state): the last block's own output is taken by a hook. (Were that to change,
    the comparison after ln_f would fail, not pass.)"""
    last: list[torch.Tensor] = []
    hook = hf.transformer.h[-1].register_forward_hook(lambda _module, _args, out: last.append(out))
    try:
        with torch.no_grad():
            hs = [h[0] for h in hf(torch.tensor([ids]), output_hidden_states=True).hidden_states]
    finally:
        hook.remove()
    blocks = hs[1:n_layer] + [last[0][0]]
    return {None: hs[n_layer].mean(0).numpy(), **{k: blocks[k].mean(0).numpy() for k in range(n_layer)}}


def test_embed(conn, models):
    name, _, ckpt, hf = models
    eng = NumpyEngine(ckpt)
    worst = 0.0
    for text in TEXTS:
        for layer, want in hf_embeddings(hf, eng.encode(text), ckpt.hparams["n_layer"]).items():
            (got,), = conn.execute(f"SELECT {name}.embed(%s, %s)::real[]", (text, layer)).fetchall()
            worst = max(worst, float(np.abs(np.array(got) - want).max() / np.abs(want).max()))
    print(f"\n{name}: max |embed_sql - transformers| / max |embed| {worst:.2e}")
    assert worst <= EMBED_TOL, f"embed: {worst:.3e}"


def test_fp16_drift_from_fp32(conn, models):
    """fp16 weights against the fp32 checkpoint (transformers): bounded drift, after the prompt and at decode
    steps."""
    _, name16, ckpt, hf = models
    after_prompt, decode, n_decode = logprob_differences(conn, name16, ckpt, hf)
    print(f"\n{name16}: max |logprob_sql_fp16 - logprob_transformers| after the prompt {after_prompt:.2e}, "
          f"at {n_decode} decode steps {decode:.2e}")
    assert max(after_prompt, decode) <= FP16_LOGPROB_TOL, f"fp16: {after_prompt:.3e}, {decode:.3e}"
