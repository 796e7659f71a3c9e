#!/usr/bin/env python3
"""Train the small GPT-2-architecture model that ships with gpt-sql (`loader/models/shakespeare-mini/`).

Everything here is GPT-2 exactly, only smaller, so the SQL engine runs it unchanged:

* tokenizer: a byte-level BPE in GPT-2's own scheme (GPT-2's byte<->unicode alphabet, GPT-2's
  pre-tokenizer regex, merges applied by rank), trained with Hugging Face `tokenizers` and laid out
  like GPT-2's: ids 0..255 are the 256 byte tokens in `bytes_to_unicode()` order, merge number r
  makes token 256 + r, and `<|endoftext|>` is the last id. It is checked token for token against
  the project's reference tokenizer (`gpt_sql.runner.tokenizer.Tokenizer`) before any training.
* model: pre-LN transformer blocks, causal self-attention scaled by 1/sqrt(head_dim), GELU (tanh
  approximation), MLP 4x, final layer norm, logits tied to the token embedding, LayerNorm eps 1e-5,
  biases everywhere.
* export: a `gpt_sql.loader.checkpoint.Checkpoint` written as a Hugging Face directory in fp16
  (config.json, vocab.json, merges.txt, model.safetensors), re-read and checked against a NumPy
  forward pass.

Data: tinyshakespeare, split 90/10 by characters at a line boundary; the tokenizer is trained on the
training part only, so the validation part is fully held out.

Runs on one CPU thread on purpose (reproducible, and leaves the other core free).

    python training/train_shakespeare.py --calibrate          # time a few candidate sizes
    python training/train_shakespeare.py                      # train + export + model card
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"
DEFAULT_OUT = REPO / "loader" / "models" / "shakespeare-mini"
EOT = "<|endoftext|>"

# Strings that must tokenize identically with the reference and the HF tokenizer (bytes never seen
# in training included: every byte has a token, so anything encodes).
UNICODE_CHECKS = [
    "Happy New Year!",
    "ROMEO:\nO, she doth teach the torches to burn bright!",
    "Ünïcödé wörds, naïve café, Москва, 東京, 🙂 emoji, 👩‍👩‍👧, Ελληνικά, עברית, हिन्दी.",
    "  leading spaces,\ttabs\t\tand\r\nwindows newlines\n\n\n   trailing   ",
    "numbers 1234567890 3.14159 -42 1e10 ½ ² ٣",
    "it's we're they've I'm you'll he'd IT'S Don'T",
    "SELECT token FROM tokens WHERE id = 42; -- SQL\x00\x01\x7f",
    "\u00a0\u2003\u200b\ufeff zero-width and odd spaces \u3000",
    "",
    " ",
    "\n",
]


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def _hf_pipeline(model):
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(text: str, vocab_size: int):
    """Train a GPT-2-scheme byte-level BPE on `text`; n_vocab is exactly `vocab_size` (incl. <|endoftext|>).

    Returns (hf_tokenizer, encoder, merges). The HF tokenizer is rebuilt from `encoder`/`merges`, so
    its ids are the GPT-2 layout: 256 bytes, then 256 + merge rank, then <|endoftext|> last.
    `<|endoftext|>` is an ordinary vocabulary entry, not an HF "special" token: like OpenAI's encoder
    (and the project's reference tokenizer), the literal text "<|endoftext|>" is not special.
    """
    from tokenizers import models, pre_tokenizers, trainers

    from gpt_sql.runner.tokenizer import bytes_to_unicode

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 1 merge + <|endoftext|>), got {vocab_size}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        min_frequency=2,
        show_progress=False,
    )
    trained = _hf_pipeline(models.BPE())
    # One sequence: the pre-tokenizer regex sees the text exactly as encode() will later.
    trained.train_from_iterator([text], trainer, length=1)
    model = json.loads(trained.to_str())["model"]
    raw_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    trained_vocab: dict[str, int] = model["vocab"]

    alphabet = list(bytes_to_unicode().values())
    encoder = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for a, b in raw_merges:
        if a not in encoder or b not in encoder:
            raise RuntimeError(f"merge {a!r} {b!r} uses a token not made by an earlier merge")
        if a + b in encoder:
            raise RuntimeError(f"merge {a!r} {b!r} makes {a + b!r}, which already has an id: "
                               "the GPT-2 layout (token = 256 + rank) cannot hold; try another vocab size")
        encoder[a + b] = len(encoder)
        merges.append((a, b))
    encoder[EOT] = len(encoder)
    if set(encoder) != set(trained_vocab):
        diff = sorted(set(encoder) ^ set(trained_vocab))[:10]
        raise RuntimeError(f"re-laid-out vocabulary differs from the trained one, e.g. {diff}")
    if len(encoder) != vocab_size:
        # the trainer stops early only when no pair occurs twice: a tiny text
        print(f"tokenizer: the text supports only {len(encoder)} tokens (asked for {vocab_size})", file=sys.stderr)

    hf = _hf_pipeline(models.BPE(vocab=encoder, merges=merges))
    # the trained tokenizer, with its own id order, must agree with the re-laid-out one
    remap = {trained_vocab[s]: i for s, i in encoder.items()}
    probe = text[: 200_000]
    if [remap[i] for i in trained.encode(probe).ids] != hf.encode(probe).ids:
        raise RuntimeError("the re-laid-out HF tokenizer does not reproduce the trained tokenizer")
    return hf, encoder, merges


def verify_tokenizer(hf_tok, encoder: dict[str, int], merges: list[tuple[str, str]], texts: dict[str, str]):
    """Assert that the project's reference tokenizer and the HF tokenizer give identical ids on every text.

    Also checks the GPT-2 id layout and that decoding gives back the text. Raises AssertionError.
    Returns the reference tokenizer and {name: ids}.
    """
    from gpt_sql.runner.tokenizer import Tokenizer, bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    for i, c in enumerate(alphabet):
        assert encoder[c] == i, f"byte token {c!r} has id {encoder[c]}, GPT-2's layout says {i}"
    for r, (a, b) in enumerate(merges):
        assert encoder[a + b] == 256 + r, f"merge {r} ({a!r} {b!r}) makes id {encoder[a + b]}, expected {256 + r}"
    assert encoder[EOT] == len(encoder) - 1, "<|endoftext|> must be the last id"
    assert sorted(encoder.values()) == list(range(len(encoder))), "token ids are not 0..n_vocab-1"

    ref = Tokenizer(encoder, merges)
    out = {}
    for name, text in texts.items():
        a = ref.encode(text)
        b = hf_tok.encode(text).ids
        if a != b:
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise AssertionError(
                f"tokenizer mismatch on {name!r} at token {k}: reference {a[max(0, k - 3):k + 3]} "
                f"vs HF {b[max(0, k - 3):k + 3]} ({len(a)} vs {len(b)} tokens)")
        assert ref.decode_bytes(a) == text.encode("utf-8"), f"reference decode does not round-trip {name!r}"
        assert hf_tok.decode(b) == text, f"HF decode does not round-trip {name!r}"
        out[name] = a
    return ref, out


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split at the first line boundary at or after (1 - val_fraction) of the characters."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", cut)
    cut = len(text) if nl < 0 else nl + 1
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    n_vocab: int
    n_ctx: int = 256
    n_embd: int = 192
    n_head: int = 6
    n_layer: int = 6
    dropout: float = 0.0

    def hparams(self) -> dict[str, int]:
        return {"n_vocab": self.n_vocab, "n_ctx": self.n_ctx, "n_embd": self.n_embd,
                "n_head": self.n_head, "n_layer": self.n_layer}


def build_model(cfg: ModelConfig, seed: int = 0):
    """A GPT-2 in PyTorch (pre-LN, tied embeddings, GELU-tanh, LN eps 1e-5, biases everywhere)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
            self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, x):
            B, T, C = x.shape
            H = cfg.n_head
            q, k, v = self.c_attn(x).split(C, dim=2)  # GPT-2's order: q | k | v, heads contiguous
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            # softmax(q k^T / sqrt(head_dim) + causal mask) v; no dropout on the attention weights,
            # which would force PyTorch's slow non-fused path on CPU
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.drop(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
            self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, x):
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's gelu
            return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = cfg
            self.wte = nn.Embedding(cfg.n_vocab, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)

        def forward(self, idx, targets=None):
            T = idx.shape[1]
            if T > cfg.n_ctx:
                raise ValueError(f"sequence of {T} tokens is longer than n_ctx {cfg.n_ctx}")
            x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied output embedding, no bias (as GPT-2)
            if targets is None:
                return logits
            return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    torch.manual_seed(seed)
    model = GPT()
    # GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), zero biases
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif ".ln_" in name or name.startswith("ln_"):
            nn.init.ones_(p)
        elif name.endswith("c_proj.weight"):
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        elif name == "wpe.weight":
            nn.init.normal_(p, 0.0, 0.01)
        else:
            nn.init.normal_(p, 0.0, 0.02)
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int = 1200
    batch_size: int = 8
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 64  # windows of n_ctx tokens for the train-loss estimate
    seed: int = 1337
    log_every: int = 50
    bf16: bool = False  # bfloat16 autocast for the training steps (evaluation stays float32)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    span = max(1, tc.steps - tc.warmup)
    progress = min(1.0, (step - tc.warmup) / span)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def windows(ids, n_ctx: int):
    """Non-overlapping (input, target) windows covering `ids` (the last one may be shorter)."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)
    out = []
    for s in range(0, len(ids) - 1, n_ctx):
        chunk = ids[s: s + n_ctx + 1]
        if len(chunk) >= 2:
            out.append((chunk[:-1], chunk[1:]))
    return out


def evaluate(model, wins, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over the windows, weighted by tokens."""
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        by_len: dict[int, list] = {}
        for x, y in wins:
            by_len.setdefault(len(x), []).append((x, y))
        for group in by_len.values():
            for i in range(0, len(group), batch_size):
                xs = torch.stack([x for x, _ in group[i:i + batch_size]])
                ys = torch.stack([y for _, y in group[i:i + batch_size]])
                logits = model(xs)
                total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), ys.reshape(-1),
                                         reduction="sum").item()
                count += ys.numel()
    model.train(was)
    return total / max(1, count)


def unigram_loss(train_ids, val_ids, n_vocab: int) -> float:
    """Cross-entropy of val tokens under add-one-smoothed train unigram frequencies (a baseline)."""
    counts = np.bincount(np.asarray(train_ids), minlength=n_vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_ids)].mean())


def train(model, train_ids, val_ids, tc: TrainConfig, log=print):
    """AdamW with warmup + cosine decay on random windows of train_ids; keeps the best-validation weights.

    Returns a dict: best_state (state_dict copy), best_step, best_val, final train/val losses,
    history [(step, train_loss, val_loss, seconds)], wall_seconds, tokens_seen.
    """
    import torch

    n_ctx = model.cfg.n_ctx
    train_ids_t = torch.as_tensor(train_ids, dtype=torch.long)
    if len(train_ids_t) < n_ctx + 2:
        raise ValueError(f"training text has {len(train_ids_t)} tokens, fewer than n_ctx + 2 = {n_ctx + 2}")
    val_wins = windows(val_ids, n_ctx)
    gen = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed)  # dropout
    # a fixed set of train windows to estimate train loss at each evaluation
    starts = torch.randint(0, len(train_ids_t) - n_ctx - 1, (tc.eval_windows,), generator=gen)
    train_eval_wins = [(train_ids_t[s:s + n_ctx], train_ids_t[s + 1:s + n_ctx + 1]) for s in starts.tolist()]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), foreach=True)
    offs = torch.arange(n_ctx + 1)
    history = []
    best = {"val": float("inf"), "step": -1, "state": None}
    t0 = time.perf_counter()

    def do_eval(step):
        tr = evaluate(model, train_eval_wins)
        va = evaluate(model, val_wins) if val_wins else float("nan")
        secs = time.perf_counter() - t0
        history.append((step, tr, va, secs))
        if val_wins and va < best["val"]:
            best.update(val=va, step=step, state=copy.deepcopy(model.state_dict()))
        log(f"eval step {step:6d}  train {tr:.4f}  val {va:.4f}  best val {best['val']:.4f} @ {best['step']}  "
            f"{secs:7.1f}s")

    model.train()
    running = None
    for step in range(tc.steps):
        if tc.eval_every and step % tc.eval_every == 0 and step > 0:
            do_eval(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        s = torch.randint(0, len(train_ids_t) - n_ctx - 1, (tc.batch_size,), generator=gen)
        chunk = train_ids_t[s[:, None] + offs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if tc.log_every and (step % tc.log_every == 0 or step == tc.steps - 1):
            el = time.perf_counter() - t0
            log(f"step {step:6d}  loss {loss.item():.4f}  (smoothed {running:.4f})  lr {lr_at(step, tc):.2e}  "
                f"{el:7.1f}s  {1000 * el / (step + 1):.0f} ms/step")
    do_eval(tc.steps)
    wall = time.perf_counter() - t0
    if best["state"] is None:  # no validation data: keep the last weights
        best.update(step=tc.steps, state=copy.deepcopy(model.state_dict()))
    last = history[-1]
    return {"best_state": best["state"], "best_step": best["step"], "best_val": best["val"],
            "final_train": last[1], "final_val": last[2], "history": history, "wall_seconds": wall,
            "tokens_seen": tc.steps * tc.batch_size * n_ctx}


# --------------------------------------------------------------------------------------------
# export + checks
# --------------------------------------------------------------------------------------------

def to_checkpoint(model, encoder, merges, source: str = "shakespeare-mini"):
    """The model's weights as a gpt_sql Checkpoint (picoGPT names, matrices [n_in, n_out], float32)."""
    from gpt_sql.loader.checkpoint import Checkpoint, validate

    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    cfg = model.cfg
    params = {"wte": sd["wte.weight"], "wpe": sd["wpe.weight"],
              "ln_f.g": sd["ln_f.weight"], "ln_f.b": sd["ln_f.bias"]}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            params[p + ln + ".g"] = sd[p + ln + ".weight"]
            params[p + ln + ".b"] = sd[p + ln + ".bias"]
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            params[p + lin + ".w"] = sd[p + lin + ".weight"].T.copy()  # torch Linear is [n_out, n_in]
            params[p + lin + ".b"] = sd[p + lin + ".bias"]
    ckpt = Checkpoint(hparams=cfg.hparams(), encoder=dict(encoder), merges=list(merges), params=params,
                      source=source)
    return validate(ckpt)


def export(model, encoder, merges, out_dir, dtype: str = "float16", source: str = "shakespeare-mini"):
    """Write the model as a Hugging Face GPT-2 directory via gpt_sql.loader.hf_format.write_hf."""
    from gpt_sql.loader.hf_format import write_hf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = to_checkpoint(model, encoder, merges, source=source)
    write_hf(ckpt, out_dir, dtype=dtype)
    return ckpt


def numpy_logits(params: dict, hp: dict, ids) -> np.ndarray:
    """A plain NumPy GPT-2 forward pass (picoGPT style) over float32 arrays; returns [T, n_vocab]."""
    def ln(x, g, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    P = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    T = len(ids)
    d, H = hp["n_embd"], hp["n_head"]
    hd = d // H
    x = P["wte"][list(ids)] + P["wpe"][:T]
    mask = np.triu(np.full((T, T), -1e10), 1)
    for i in range(hp["n_layer"]):
        p = f"h.{i}."
        a = ln(x, P[p + "ln_1.g"], P[p + "ln_1.b"]) @ P[p + "attn.c_attn.w"] + P[p + "attn.c_attn.b"]
        q, k, v = np.split(a, 3, axis=-1)
        heads = []
        for h in range(H):
            sl = slice(h * hd, (h + 1) * hd)
            w = softmax(q[:, sl] @ k[:, sl].T / np.sqrt(hd) + mask)
            heads.append(w @ v[:, sl])
        x = x + np.hstack(heads) @ P[p + "attn.c_proj.w"] + P[p + "attn.c_proj.b"]
        m = gelu(ln(x, P[p + "ln_2.g"], P[p + "ln_2.b"]) @ P[p + "mlp.c_fc.w"] + P[p + "mlp.c_fc.b"])
        x = x + m @ P[p + "mlp.c_proj.w"] + P[p + "mlp.c_proj.b"]
    return (ln(x, P["ln_f.g"], P["ln_f.b"]) @ P["wte"].T).astype(np.float32)


def check_export(model, out_dir, encoder, merges, prompt: str = "ROMEO:\nWhat light through yonder window breaks?"):
    """Re-read the exported directory and compare logits with the torch model (weights rounded to fp16).

    Returns the max abs logit difference; raises AssertionError when the export is wrong.
    """
    import torch

    from gpt_sql.loader.checkpoint import read_checkpoint
    from gpt_sql.runner.tokenizer import Tokenizer

    ck = read_checkpoint(out_dir)
    assert ck.hparams == model.cfg.hparams(), f"hparams {ck.hparams} != {model.cfg.hparams()}"
    assert ck.encoder == dict(encoder), "exported vocabulary differs"
    assert [tuple(m) for m in ck.merges] == [tuple(m) for m in merges], "exported merges differ"
    ids = Tokenizer(ck.encoder, ck.merges).encode(prompt)[: model.cfg.n_ctx]
    rounded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
        ref = rounded(torch.tensor([ids]))[0].numpy()
    got = numpy_logits(ck.params, ck.hparams, ids)
    diff = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    assert diff <= 1e-3 * max(1.0, scale), f"exported logits differ from torch by {diff} (|logits| up to {scale})"
    assert (ref.argmax(-1) == got.argmax(-1)).all(), "exported model predicts different tokens"
    return diff


def generate(model, ids, n_new: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """Greedy (temperature 0) or sampled continuation; crops the context to n_ctx."""
    import torch

    g = torch.Generator().manual_seed(seed)
    model.eval()
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            x = torch.tensor([ids[-model.cfg.n_ctx:]])
            logits = model(x)[0, -1]
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=g))
            ids.append(nxt)
    return ids


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------

CANDIDATES = [  # (n_embd, n_layer, n_head, n_ctx)
    (128, 4, 4, 256),
    (192, 6, 6, 256),
    (192, 6, 6, 512),
    (256, 6, 8, 256),
    (256, 6, 8, 512),
]


def calibrate(train_ids, n_vocab: int, batch_tokens: int, steps: int, candidates=CANDIDATES, log=print,
              dropout: float = 0.1, bf16: bool = False):
    """Time `steps` training steps of each candidate (batch of ~batch_tokens tokens); returns a list of dicts."""
    import torch

    rows = []
    for d, L, H, T in candidates:
        cfg = ModelConfig(n_vocab=n_vocab, n_ctx=T, n_embd=d, n_head=H, n_layer=L, dropout=dropout)
        model = build_model(cfg, seed=0)
        tc = TrainConfig(steps=steps + 3, batch_size=max(1, batch_tokens // T), eval_every=0, log_every=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        ids = torch.as_tensor(train_ids[: 50_000], dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        times = []
        for i in range(tc.steps):
            t = time.perf_counter()
            s = torch.randint(0, len(ids) - T - 1, (tc.batch_size,), generator=g)
            chunk = ids[s[:, None] + torch.arange(T + 1)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(chunk[:, :-1], chunk[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 3:  # warm-up steps not timed
                times.append(time.perf_counter() - t)
        n = count_params(model)
        ms = 1000 * float(np.median(times))
        row = {"dropout": dropout, "bf16": bf16, "n_embd": d, "n_layer": L, "n_head": H, "n_ctx": T, "batch": tc.batch_size, "params": n,
               "fp16_mb": 2 * n / 1e6, "ms_per_step": ms, "tokens_per_s": tc.batch_size * T / (ms / 1000)}
        log(f"calibrate d={d} L={L} H={H} ctx={T} batch={tc.batch_size}: {n / 1e6:.2f}M params, "
            f"{row['fp16_mb']:.1f} MB fp16, {ms:.0f} ms/step, {row['tokens_per_s']:.0f} tok/s")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------

def write_model_card(out_dir: Path, info: dict):
    hp = info["hparams"]
    tc = info["train_config"]
    lines = [
        "# shakespeare-mini",
        "",
        "A small GPT-2-architecture language model trained from scratch on tinyshakespeare, shipped with",
        "gpt-sql so that `gpt-sql run \"Happy New Year!\"` works offline on a fresh machine. It is GPT-2",
        "exactly, only smaller: the SQL engine runs it with no special case. Expect Shakespeare-flavoured",
        "pastiche, not sense.",
        "",
        "## Architecture",
        "",
        "GPT-2: pre-LN transformer blocks, causal self-attention scaled by 1/sqrt(head_dim), GELU (tanh",
        "approximation), MLP 4x, final layer norm `ln_f`, logits tied to the token embedding (`x @ wte.T`),",
        "LayerNorm eps 1e-5, biases everywhere. Learned position embeddings.",
        "",
        "| hparam | value |",
        "| --- | --- |",
        *[f"| {k} | {hp[k]} |" for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")],
        "",
        f"Parameters: {info['n_params']:,} ({info['n_params'] / 1e6:.2f} M). Stored as float16 safetensors:",
        f"`model.safetensors` is {info['safetensors_bytes']:,} bytes ({info['safetensors_bytes'] / 2**20:.1f} MiB).",
        "Files: `config.json`, `vocab.json`, `merges.txt`, `model.safetensors` (Hugging Face GPT-2 layout,",
        "Conv1D orientation `[n_in, n_out]`).",
        "",
        "## Data",
        "",
        "tinyshakespeare (Karpathy's char-rnn corpus: about 40,000 lines from Shakespeare's plays; the plays",
        f"are in the public domain), {info['n_chars']:,} characters. Split by characters at a line boundary:",
        f"the first 90% ({info['n_train_chars']:,} chars, {info['n_train_tokens']:,} tokens) for training, the last 10%",
        f"({info['n_val_chars']:,} chars, {info['n_val_tokens']:,} tokens) held out for validation. Nothing is",
        "inserted between lines; `<|endoftext|>` exists in the vocabulary but never occurs in the data.",
        "",
        "## Tokenizer",
        "",
        f"A byte-level BPE in GPT-2's own scheme with {hp['n_vocab']:,} tokens, trained with Hugging Face",
        "`tokenizers` (`BpeTrainer`, min frequency 2, `ByteLevel(add_prefix_space=False, use_regex=True)`",
        "pre-tokenizer, i.e. GPT-2's byte<->unicode alphabet and pre-tokenizer regex) on the training 90% only.",
        f"Layout as GPT-2's: ids 0-255 are the byte tokens in `bytes_to_unicode()` order, merge rank r is token",
        f"256 + r ({info['n_merges']} merges), and `<|endoftext|>` is the last id ({hp['n_vocab'] - 1}).",
        "Any text encodes (every byte has a token). Before training, the script checked that the project's",
        "reference tokenizer (`gpt_sql.runner.tokenizer.Tokenizer`) and the HF tokenizer give identical ids on",
        "the whole training text, the held-out text and a set of Unicode strings.",
        f"Average {info['chars_per_token']:.2f} characters per token on the training text.",
        "",
        "## Choice of size",
        "",
        info["size_choice"],
        "",
        "## Training",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"- seed {tc['seed']}; one CPU thread (`torch.set_num_threads(1)`), PyTorch {info['torch_version']}, "
        f"tokenizers {info['tokenizers_version']}, {info['cpu']}",
        f"- {tc['steps']:,} steps of {tc['batch_size']} random windows x {hp['n_ctx']} tokens "
        f"({info['tokens_seen']:,} tokens, {info['tokens_seen'] / info['n_train_tokens']:.1f} epochs)",
        f"- AdamW (betas {tc['beta1']}, {tc['beta2']}; weight decay {tc['weight_decay']} on matrices and embeddings), "
        f"lr {tc['lr']} with {tc['warmup']} linear warmup steps then cosine decay to {tc['min_lr']}; "
        f"gradient clipping {tc['grad_clip']}; dropout {info['dropout']} on the embeddings and the residual "
        f"branches (training only; none on attention weights); "
        f"{'bfloat16 autocast for the training steps (float32 master weights and optimizer state)' if tc['bf16'] else 'float32'}",
        f"- validation every {tc['eval_every']} steps on the whole held-out text (non-overlapping "
        f"{hp['n_ctx']}-token windows); the best validation checkpoint is kept: step {info['best_step']:,}",
        f"- training wall time {info['wall_seconds'] / 60:.1f} min (whole script {info['script_seconds'] / 60:.1f} min)",
        "",
        "## Results",
        "",
        "Cross-entropy in nats per token:",
        "",
        "| | loss |",
        "| --- | --- |",
        f"| train (estimate on {tc['eval_windows']} fixed random windows), kept checkpoint | {info['best_train']:.4f} |",
        f"| validation (held-out 10%), kept checkpoint | {info['best_val']:.4f} |",
        f"| validation, unigram baseline (add-one smoothed train token frequencies) | {info['unigram_val']:.4f} |",
        f"| validation, uniform over the vocabulary | {math.log(hp['n_vocab']):.4f} |",
        "",
        f"Validation perplexity {math.exp(info['best_val']):.1f} per token, "
        f"{info['best_val'] * info['n_val_tokens'] / info['n_val_chars'] / math.log(2):.3f} bits per character."
        + (" The validation loss was still falling at the last step: the model is limited by the training "
           "time budget, not by overfitting." if info["best_step"] == tc["steps"] else ""),
        f"The exported fp16 weights, re-read with `gpt_sql.loader.checkpoint.read_checkpoint` and run by a",
        f"NumPy forward pass, match the PyTorch model's logits to {info['export_diff']:.1e} (max abs).",
        "",
        "Loss during training:",
        "",
        "| step | train | val | minutes |",
        "| --- | --- | --- | --- |",
        *[f"| {s} | {tr:.4f} | {va:.4f} | {sec / 60:.1f} |" for s, tr, va, sec in info["history"]],
        "",
        "## Samples",
        "",
        "From the PyTorch model (the kept checkpoint), 100 new tokens each; greedy and temperature 0.8",
        "(sampling seed 0); each text starts with its prompt.",
        "",
    ]
    for s in info["samples"]:
        lines += [f"### {s['prompt']!r}, {s['mode']}", "", "```", s["text"], "```", ""]
    lines += [
        "## Use",
        "",
        "`gpt-sql run` falls back to this model when no model is loaded and GPT-2 cannot be had offline;",
        "it can also be loaded by hand (`gpt-sql load` with this directory). Greedy decoding in SQL",
        "(`gpt-sql run \"Happy New Year!\" --top-n 1 --tokens 100`) should reproduce the greedy sample above up to",
        "float rounding.",
        "",
        "## Limitations",
        "",
        "A few million parameters trained for minutes on one megabyte of text: it imitates the look of the",
        "plays (speaker names, verse lines, archaic words) but makes little sense, and it knows nothing else.",
        "",
    ]
    (out_dir / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


SIZE_CHOICE_DEFAULT = "(not recorded: pass --calibration FILE and --size-note FILE to include the timings and reasons)"


def size_choice_text(calibration_files: list[str] | None, note_file: str | None) -> str:
    """The model card's "Choice of size" section: the --calibrate timing tables and a note on the choice."""
    if not calibration_files and not note_file:
        return SIZE_CHOICE_DEFAULT
    out: list[str] = []
    for f in calibration_files or []:
        data = json.loads(Path(f).read_text())
        rows = data["rows"]
        if out:
            out.append("")
        out += [
            f"`--calibrate` ({data['steps']} timed steps per candidate after 3 untimed ones, one thread, "
            f"~{data['batch_tokens']} tokens per step{', ' + data['label'] if data.get('label') else ''}):",
            "",
            "| n_embd | n_layer | n_head | n_ctx | batch | dropout | bf16 autocast | params | fp16 MB | ms/step | tokens/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            out.append(
                f"| {r['n_embd']} | {r['n_layer']} | {r['n_head']} | {r['n_ctx']} | {r['batch']} | "
                f"{r.get('dropout', '')} | {'yes' if r.get('bf16') else 'no'} | {r['params'] / 1e6:.2f} M | "
                f"{r['fp16_mb']:.1f} | {r['ms_per_step']:.0f} | {r['tokens_per_s']:.0f} |")
    if note_file:
        out += ["", Path(note_file).read_text(encoding="utf-8").strip()]
    return "\n".join(out).strip()


def parse_candidates(spec: str) -> list[tuple[int, int, int, int]]:
    """"256x6x8x512,192x6x6x512" -> [(n_embd, n_layer, n_head, n_ctx), ...]"""
    out = []
    for item in spec.split(","):
        parts = [int(x) for x in item.strip().lower().split("x")]
        if len(parts) != 4:
            raise argparse.ArgumentTypeError(f"candidate {item!r} is not n_embd x n_layer x n_head x n_ctx")
        out.append(tuple(parts))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Train shakespeare-mini, a small GPT-2 on tinyshakespeare, and export it for gpt-sql.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="training text (tinyshakespeare.txt)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output checkpoint directory")
    ap.add_argument("--vocab-size", type=int, default=3000, help="tokens incl. <|endoftext|>")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--min-lr", type=float, default=TrainConfig.min_lr)
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast for training steps (~1.5x faster on CPUs with AVX512-BF16); "
                         "evaluation and export are float32/float16 regardless")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs reproducible)")
    ap.add_argument("--calibrate", action="store_true",
                    help="only time a few training steps of --candidates (with --batch-size x --n-ctx "
                         "tokens per step, --dropout, --bf16) and write the timings to --calibration")
    ap.add_argument("--candidates", type=parse_candidates,
                    default=",".join("x".join(map(str, c)) for c in CANDIDATES),
                    help="with --calibrate: n_embd x n_layer x n_head x n_ctx, comma separated")
    ap.add_argument("--calibrate-steps", type=int, default=20)
    ap.add_argument("--calibration", nargs="+", default=None, metavar="FILE",
                    help="JSON written by --calibrate; when training, tables for the model card")
    ap.add_argument("--size-note", default=None, metavar="FILE",
                    help="markdown explaining the size choice, for the model card")
    ap.add_argument("--no-card", action="store_true", help="do not write MODEL_CARD.md")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    script_t0 = time.perf_counter()
    import tokenizers
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    def log(msg):
        print(msg, flush=True)

    text = Path(args.data).read_text(encoding="utf-8")
    train_text, val_text = split_text(text, 0.1)
    log(f"data: {args.data}: {len(text):,} chars; train {len(train_text):,}, val {len(val_text):,}")

    t = time.perf_counter()
    hf_tok, encoder, merges = train_tokenizer(train_text, args.vocab_size)
    log(f"tokenizer: {len(encoder)} tokens ({len(merges)} merges) in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    checks = {"train text": train_text, "held-out text": val_text, "whole text": text}
    checks.update({f"unicode {i}": s for i, s in enumerate(UNICODE_CHECKS)})
    _, encoded = verify_tokenizer(hf_tok, encoder, merges, checks)
    log(f"tokenizer verified against the reference on {len(checks)} texts in {time.perf_counter() - t:.1f}s")
    train_ids, val_ids = encoded["train text"], encoded["held-out text"]
    n_vocab = len(encoder)
    log(f"tokens: train {len(train_ids):,}, val {len(val_ids):,} ({len(train_text) / len(train_ids):.2f} chars/token)")

    if args.calibrate:
        batch_tokens = args.batch_size * args.n_ctx
        rows = calibrate(train_ids, n_vocab, batch_tokens, args.calibrate_steps, candidates=args.candidates,
                         log=log, dropout=args.dropout, bf16=args.bf16)
        if args.calibration:
            Path(args.calibration[0]).write_text(json.dumps(
                {"steps": args.calibrate_steps, "batch_tokens": batch_tokens, "rows": rows}, indent=1))
        return 0

    cfg = ModelConfig(n_vocab=n_vocab, n_ctx=args.n_ctx, n_embd=args.n_embd, n_head=args.n_head,
                      n_layer=args.n_layer, dropout=args.dropout)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                     warmup=args.warmup, weight_decay=args.weight_decay, eval_every=args.eval_every,
                     seed=args.seed, bf16=args.bf16)
    model = build_model(cfg, seed=args.seed)
    n_params = count_params(model)
    log(f"model: {cfg}, {n_params:,} parameters ({2 * n_params / 1e6:.1f} MB in fp16)")
    unigram = unigram_loss(train_ids, val_ids, n_vocab)
    log(f"unigram baseline val loss {unigram:.4f}; uniform {math.log(n_vocab):.4f}")

    result = train(model, train_ids, val_ids, tc, log=log)
    model.load_state_dict(result["best_state"])
    model.eval()
    best_train = next(tr for s, tr, va, _ in result["history"] if s == result["best_step"])
    log(f"training done in {result['wall_seconds'] / 60:.1f} min; best val {result['best_val']:.4f} "
        f"at step {result['best_step']} (train {best_train:.4f})")

    out = Path(args.out)
    export(model, encoder, merges, out, dtype="float16")
    diff = check_export(model, out, encoder, merges)
    size = (out / "model.safetensors").stat().st_size
    log(f"exported to {out}: model.safetensors {size:,} bytes; fp16 logits match NumPy to {diff:.2e}")

    from gpt_sql.runner.tokenizer import Tokenizer
    ref = Tokenizer(encoder, merges)
    samples = []
    for prompt in ("Happy New Year!", "ROMEO:", "First Citizen:"):
        for mode, temp in (("greedy", 0.0), ("temperature 0.8", 0.8)):
            ids = ref.encode(prompt)
            outp = generate(model, ids, 100, temperature=temp, seed=0)
            cont = ref.decode(outp[len(ids):])
            samples.append({"prompt": prompt, "mode": mode, "text": prompt + cont})
            log(f"--- {prompt!r} {mode} ---\n{prompt}{cont}")

    if not args.no_card:
        # the card shows the command without the options that only feed the card itself
        shown, skip = [], False
        for a in (argv if argv is not None else sys.argv[1:]):
            if a.startswith("--"):
                skip = a.split("=")[0] in ("--calibration", "--size-note")
            if not skip:
                shown.append(a)
        info = {
            "hparams": cfg.hparams(), "n_params": n_params, "safetensors_bytes": size,
            "n_chars": len(text), "n_train_chars": len(train_text), "n_val_chars": len(val_text),
            "n_train_tokens": len(train_ids), "n_val_tokens": len(val_ids),
            "chars_per_token": len(train_text) / len(train_ids),
            "n_merges": len(merges), "size_choice": size_choice_text(args.calibration, args.size_note),
            "command": " ".join(["python training/train_shakespeare.py", *shown]),
            "train_config": asdict(tc), "dropout": cfg.dropout,
            "torch_version": torch.__version__, "tokenizers_version": tokenizers.__version__,
            "cpu": cpu_name(),
            "tokens_seen": result["tokens_seen"], "best_step": result["best_step"],
            "wall_seconds": result["wall_seconds"], "script_seconds": time.perf_counter() - script_t0,
            "best_train": best_train, "best_val": result["best_val"], "unigram_val": unigram,
            "export_diff": diff, "history": result["history"], "samples": samples,
        }
        write_model_card(out, info)
        log(f"wrote {out / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
