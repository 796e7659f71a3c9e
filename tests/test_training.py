"""training/train_shakespeare.py: a tiny tokenizer + model + training run + export, end to end.

Needs torch and tokenizers (the `train` extra plus a CPU torch); skipped without them.
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np
import pytest

from conftest import require

torch = require("torch", reason="training needs torch (pip install torch, a CPU build is enough)")
require("tokenizers", reason="training needs Hugging Face tokenizers (pip install tokenizers)")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "training"))
import train_shakespeare as ts  # noqa: E402

from gpt_sql.loader.checkpoint import read_checkpoint  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer, bytes_to_unicode  # noqa: E402

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"

FALLBACK = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\n"
    # enough more for the 400-token vocabulary the tests train (the lines above run out of pairs at 395)
    "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\nThat flesh is heir to.\n\n"
    "MACBETH:\nTo-morrow, and to-morrow, and to-morrow,\nCreeps in this petty pace from day to day\n"
    "To the last syllable of recorded time;\nAnd all our yesterdays have lighted fools\n"
    "The way to dusty death. Out, out, brief candle!\n\n"
)


@pytest.fixture(scope="module")
def text() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text(encoding="utf-8")[:30_000]
    return FALLBACK * 40


@pytest.fixture(scope="module")
def tokenizer(text):
    return ts.train_tokenizer(text, 400)


def tiny_model(n_vocab: int, seed: int = 0):
    torch.set_num_threads(1)
    cfg = ts.ModelConfig(n_vocab=n_vocab, n_ctx=32, n_embd=32, n_head=2, n_layer=2, dropout=0.0)
    return ts.build_model(cfg, seed=seed)


def test_tokenizer_layout_and_agreement(text, tokenizer):
    hf, encoder, merges = tokenizer
    assert len(encoder) == 400
    be = list(bytes_to_unicode().values())
    assert [encoder[c] for c in be] == list(range(256))
    assert all(encoder[a + b] == 256 + r for r, (a, b) in enumerate(merges))
    assert encoder[ts.EOT] == 399
    train_text, val_text = ts.split_text(text)
    checks = {"train": train_text, "val": val_text, **{str(i): s for i, s in enumerate(ts.UNICODE_CHECKS)}}
    ref, ids = ts.verify_tokenizer(hf, encoder, merges, checks)
    assert ref.decode(ids["val"]) == val_text
    # the literal text <|endoftext|> is not special, as in OpenAI's encoder
    assert hf.encode(ts.EOT).ids == Tokenizer(encoder, merges).encode(ts.EOT) != [encoder[ts.EOT]]


def test_verify_tokenizer_fails_loudly_on_a_mismatch(text, tokenizer):
    from tokenizers import models, pre_tokenizers

    _, encoder, merges = tokenizer
    wrong = ts._hf_pipeline(models.BPE(vocab=encoder, merges=merges))
    wrong.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)  # not GPT-2's
    with pytest.raises(AssertionError, match="tokenizer mismatch"):
        ts.verify_tokenizer(wrong, encoder, merges, {"text": text[:2000]})
    swapped = list(merges)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # ids no longer 256 + rank
    with pytest.raises(AssertionError, match="merge 0"):
        ts.verify_tokenizer(wrong, encoder, swapped, {"text": text[:2000]})


def test_split_text_is_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = ts.split_text(text, 0.1)
    assert train + val == text and train.endswith("\n")
    assert 0.08 < len(val) / len(text) < 0.12


def test_lr_schedule():
    tc = ts.TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert ts.lr_at(0, tc) == pytest.approx(1e-4)
    assert ts.lr_at(9, tc) == pytest.approx(1e-3)
    assert ts.lr_at(10, tc) == pytest.approx(1e-3)
    assert ts.lr_at(100, tc) == pytest.approx(1e-4)
    assert all(ts.lr_at(s, tc) >= ts.lr_at(s + 1, tc) for s in range(10, 100))


def test_torch_model_matches_numpy_gpt2(tokenizer):
    _, encoder, merges = tokenizer
    model = tiny_model(len(encoder), seed=3).eval()
    with torch.no_grad():  # make the biases and norms non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = ts.to_checkpoint(model, encoder, merges)
    ids = Tokenizer(encoder, merges).encode("ROMEO:\nBut soft, what light")[:32]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    got = ts.numpy_logits(ckpt.params, ckpt.hparams, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_tiny_training_run_exports_a_readable_checkpoint(tmp_path, text, tokenizer):
    hf, encoder, merges = tokenizer
    train_text, val_text = ts.split_text(text)
    _, ids = ts.verify_tokenizer(hf, encoder, merges, {"train": train_text, "val": val_text})
    model = tiny_model(len(encoder))
    tc = ts.TrainConfig(steps=8, batch_size=4, warmup=2, lr=3e-3, min_lr=3e-4, eval_every=4, eval_windows=4,
                        log_every=0, seed=0)
    logs = []
    result = ts.train(model, ids["train"], ids["val"], tc, log=logs.append)
    assert [h[0] for h in result["history"]] == [4, 8]
    assert result["best_step"] in (4, 8)
    assert result["history"][-1][2] < math.log(len(encoder))  # learned something beyond uniform
    model.load_state_dict(result["best_state"])

    out = tmp_path / "tiny"
    ckpt = ts.export(model, encoder, merges, out)
    assert {p.name for p in out.iterdir()} >= {"config.json", "vocab.json", "merges.txt", "model.safetensors"}
    back = read_checkpoint(out)
    assert back.hparams == ckpt.hparams == {"n_vocab": 400, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}
    assert back.encoder == encoder and [tuple(m) for m in back.merges] == merges
    for name, a in ckpt.params.items():
        np.testing.assert_array_equal(back.params[name], a.astype(np.float16).astype(np.float32))
    assert ts.check_export(model, out, encoder, merges) < 1e-3

    # same seed, same run: training is reproducible
    again = tiny_model(len(encoder))
    result2 = ts.train(again, ids["train"], ids["val"], tc, log=lambda _: None)
    assert result2["history"][-1][1:3] == result["history"][-1][1:3]


def test_main_end_to_end(tmp_path, text):
    data = tmp_path / "data.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "model"
    rc = ts.main(["--data", str(data), "--out", str(out), "--vocab-size", "300", "--n-ctx", "32",
                  "--n-embd", "32", "--n-head", "2", "--n-layer", "1", "--steps", "4", "--batch-size", "2",
                  "--warmup", "1", "--eval-every", "2", "--no-bf16"])
    assert rc == 0
    ck = read_checkpoint(out)
    assert ck.hparams["n_vocab"] == 300 and ck.hparams["n_layer"] == 1
    card = (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Happy New Year!" in card and "--steps 4" in card


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        ts.parse_args(["--help"])
    assert e.value.code == 0
