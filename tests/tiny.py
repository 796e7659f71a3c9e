"""Tiny GPT-2 checkpoints for tests: a byte-level BPE trained here on a few sentences, random weights."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np

from gpt_sql.loader.checkpoint import Checkpoint, param_shapes, validate
from gpt_sql.runner.tokenizer import bytes_to_unicode, pretokenize

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_GPT2 = SHARED / "gpt2"

TRAIN_TEXT = (
    "Happy New Year! I wish you a happy New Year, and many happy returns of the day. "
    "The quick brown fox jumps over the lazy dog; the dog doesn't mind. It's 2026 and we're here. "
    "SELECT token FROM tokens WHERE id = 42; -- SQL is a language too.\n\n"
    "Ünïcödé wörds, naïve café, Москва, 東京, 🙂 emoji.\n"
)


def train_bpe(text: str, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A plain byte-level BPE trainer in GPT-2's scheme; ids: 256 bytes, then one per merge, then <|endoftext|>."""
    be = bytes_to_unicode()
    encoder = {c: i for i, c in enumerate(be.values())}
    words = collections.Counter(
        tuple(be[b] for b in piece.encode("utf-8")) for piece in pretokenize(text))
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        encoder[best[0] + best[1]] = len(encoder)
        new_words: collections.Counter = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    encoder["<|endoftext|>"] = len(encoder)
    return encoder, merges


def gpt2_tokenizer() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's real GPT-2 tokenizer from ../shared/gpt2 (callers skip when it is absent)."""
    encoder = json.loads((SHARED_GPT2 / "encoder.json").read_text(encoding="utf-8"))
    lines = (SHARED_GPT2 / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return encoder, merges  # type: ignore[return-value]


def make_checkpoint(n_embd: int = 32, n_head: int = 2, n_layer: int = 2, n_ctx: int = 64,
                    n_merges: int = 200, seed: int = 0, real_tokenizer: bool = False,
                    scale: float = 0.3) -> Checkpoint:
    if real_tokenizer:
        encoder, merges = gpt2_tokenizer()
    else:
        encoder, merges = train_bpe(TRAIN_TEXT, n_merges)
    hp = {"n_vocab": len(encoder), "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(hp).items():
        if name.endswith(".g"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            a = scale * rng.standard_normal(shape)
        params[name] = a.astype(np.float32)
    return validate(Checkpoint(hp, encoder, merges, params, source=f"tiny(seed={seed})"))
