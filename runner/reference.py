"""GPT-2 in NumPy, in the style of picoGPT, with a KV cache: the oracle the SQL query is compared with.

Each function has a twin CTE of the same name in sql/generate.sql.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

LN_EPS = 1e-5


def gelu(x: np.ndarray) -> np.ndarray:
    # a Python float constant: np.sqrt(2 / np.pi) is a float64 scalar, which would turn the whole fp32 forward
    # pass into float64 (and cast every weight matrix on every call)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(variance + LN_EPS) + b


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray, x_dtype: type = np.float32) -> np.ndarray:
    # with fp16 weights the input is rounded to fp16 too (SQL's as_weights), the product taken in fp32
    return x.astype(x_dtype).astype(np.float32) @ w + b


def ffn(x: np.ndarray, c_fc: dict, c_proj: dict) -> np.ndarray:
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q k^T / sqrt(hd) + mask) @ v, and the softmax weights themselves (what `inspect` shows)."""
    weights = softmax(q @ k.T / math.sqrt(q.shape[-1]) + mask)
    return weights @ v, weights


def mha(x: np.ndarray, c_attn: dict, c_proj: dict, n_head: int, cache: dict) -> np.ndarray:
    """Causal attention of the new positions `x` over the cached positions plus themselves. The cache also keeps
    the step's attention weights per head, for `inspect`."""
    q, k, v = np.split(linear(x, **c_attn), 3, axis=-1)
    cache["k"] = k = np.concatenate([cache["k"], k]) if "k" in cache else k
    cache["v"] = v = np.concatenate([cache["v"], v]) if "v" in cache else v
    n_new, n_all = q.shape[0], k.shape[0]
    mask = (1 - np.tri(n_new, n_all, k=n_all - n_new, dtype=x.dtype)) * -1e10
    heads, cache["attention"] = zip(*(attention(qh, kh, vh, mask) for qh, kh, vh in
                                      zip(*(np.split(a, n_head, axis=-1) for a in (q, k, v)))))
    return linear(np.hstack(heads), **c_proj)


def transformer_block(x: np.ndarray, mlp: dict, attn: dict, ln_1: dict, ln_2: dict, n_head: int,
                      cache: dict) -> np.ndarray:
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head, cache=cache)
    return x + ffn(layer_norm(x, **ln_2), **mlp)


def gpt2(inputs: list[int], wte: np.ndarray, wpe: np.ndarray, blocks: list[dict], ln_f: dict, n_head: int,
         cache: list[dict], x_dtype: type = np.float32) -> np.ndarray:
    """Logits for the new `inputs`, which follow the positions already in `cache` (one dict per block; each also
    keeps the residual stream after its block, "x", for the logit lens)."""
    n_past = cache[0]["k"].shape[0] if "k" in cache[0] else 0
    x = wte[inputs] + wpe[range(n_past, n_past + len(inputs))]
    for block, block_cache in zip(blocks, cache):
        x = block_cache["x"] = transformer_block(x, **block, n_head=n_head, cache=block_cache)
    return unembed(x, wte, ln_f, x_dtype)


def unembed(x: np.ndarray, wte: np.ndarray, ln_f: dict, x_dtype: type = np.float32) -> np.ndarray:
    return linear(layer_norm(x, **ln_f), wte.T, np.float32(0), x_dtype)


def logit_lens(x: np.ndarray, wte: np.ndarray, ln_f: dict, x_dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The residual stream `x` read as if it were the last block's output: per position, the most likely token
    (the first of the largest logits) and its probability (softmax over the vocabulary, temperature 1)."""
    logits = unembed(x, wte, ln_f, x_dtype)
    tokens = np.argmax(logits, axis=-1)
    probs = softmax(logits.astype(np.float64))
    return tokens, probs[np.arange(len(tokens)), tokens]


def nest_params(params: dict[str, np.ndarray], n_layer: int, x_dtype: type = np.float32) -> dict:
    """Flat checkpoint names (`h.0.attn.c_attn.w`) -> picoGPT's nested dicts; each linear carries the dtype its
    input is rounded to (the weights' dtype)."""
    def group(prefix: str, keys: dict[str, str]) -> dict:
        out = {k: params[prefix + v] for k, v in keys.items()}
        return {**out, "x_dtype": x_dtype} if "w" in out else out
    wb, gb = {"w": "w", "b": "b"}, {"g": "g", "b": "b"}
    blocks = [{
        "ln_1": group(f"h.{i}.ln_1.", gb), "ln_2": group(f"h.{i}.ln_2.", gb),
        "attn": {"c_attn": group(f"h.{i}.attn.c_attn.", wb), "c_proj": group(f"h.{i}.attn.c_proj.", wb)},
        "mlp": {"c_fc": group(f"h.{i}.mlp.c_fc.", wb), "c_proj": group(f"h.{i}.mlp.c_proj.", wb)},
    } for i in range(n_layer)]
    return {"wte": params["wte"], "wpe": params["wpe"], "blocks": blocks, "ln_f": group("ln_f.", gb)}


# --- sampling: the same rule as the `sample` CTE in SQL ---------------------------------------------------

def uniform(seed: int, step: int) -> float:
    """The uniform draw for generation step `step` (1-based): the first 52 bits of md5('<seed>:<step>')."""
    return int(hashlib.md5(f"{seed}:{step}".encode()).hexdigest()[:13], 16) / 2.0**52


def top(scaled: np.ndarray, n: int) -> np.ndarray:
    """The n largest (ties: lower id first), largest first."""
    return np.lexsort((np.arange(len(scaled)), -scaled))[:n]


def nucleus(e: np.ndarray, top_p: float) -> int:
    """How many of the candidates (exp(logit - max), most likely first) nucleus sampling keeps: the fewest whose
    share of the candidates' probability reaches top_p (all of them at top_p = 1)."""
    if top_p >= 1:
        return len(e)
    return min(len(e), int(np.searchsorted(np.cumsum(e) / e.sum(), top_p, side="left")) + 1)


def sample(logits: np.ndarray, temperature: float, top_n: int, u: float, top_p: float = 1.0) -> tuple[int, float]:
    """Top-n candidates by logit (ties: lower id first), of them the nucleus of top_p, softmax(logit / temperature)
    over those, then the first candidate whose cumulative probability exceeds u. Returns (token, its probability
    softmax(logits / temperature) over the whole vocabulary)."""
    scaled = logits.astype(np.float64) / temperature
    order = top(scaled, top_n)
    e = np.exp(scaled[order] - scaled[order[0]])
    kept = nucleus(e, top_p)
    i = int(np.searchsorted(np.cumsum(e[:kept]) / e[:kept].sum(), u, side="right"))
    token = int(order[min(i, kept - 1)])
    return token, float(softmax(scaled)[token])


def top_logprobs(logits: np.ndarray, temperature: float, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens and their log-probabilities (log softmax(logits / temperature)), most likely
    first."""
    scaled = logits.astype(np.float64) / temperature
    log_z = scaled.max() + math.log(np.exp(scaled - scaled.max()).sum())
    return [(int(t), float(scaled[t] - log_z)) for t in top(scaled, k)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax (temperature 1) in float64, shifted by the largest logit."""
    scaled = logits.astype(np.float64)
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def stop_at(text: bytes, stops: list[bytes]) -> int | None:
    """Where text first contains one of the stop strings (the earliest start), or None."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


@dataclass
class Step:
    step: int
    token: int
    prob: float
    logits: np.ndarray
    top: list[tuple[int, float]] | None = None  # with logprobs: the likeliest tokens and their log-probabilities


class Model:
    def __init__(self, hparams: dict[str, int], params: dict[str, np.ndarray], dtype: str = "float32"):
        """`params` as float32 arrays; with dtype float16 the matrices must already hold fp16 values
        (loader.checkpoint.as_dtype), and every product's input is rounded to fp16 as SQL does."""
        self.hparams = hparams
        self.x_dtype = np.float16 if dtype == "float16" else np.float32
        self.p = nest_params(params, hparams["n_layer"], self.x_dtype)

    def new_cache(self) -> list[dict]:
        return [{} for _ in range(self.hparams["n_layer"])]

    def logits(self, inputs: list[int], cache: list[dict]) -> np.ndarray:
        return gpt2(inputs, **self.p, n_head=self.hparams["n_head"], cache=cache, x_dtype=self.x_dtype)

    def inspect(self, prompt: list[int]) -> dict:
        """What the model computes for the prompt: the prompt's tokens, every head's attention weights
        attention[layer][head][query][key] (0 past the causal mask), and the logit lens after each block:
        lens_tokens[layer][position] and lens_probs[layer][position]."""
        cache = self.new_cache()
        self.logits(prompt, cache)
        lens = [logit_lens(c["x"], self.p["wte"], self.p["ln_f"], self.x_dtype) for c in cache]
        return {"tokens": list(prompt), "attention": np.array([c["attention"] for c in cache]),
                "lens_tokens": np.array([t for t, _ in lens]), "lens_probs": np.array([p for _, p in lens])}

    def generate(self, prompt: list[int], n_tokens: int, temperature: float = 1.0, top_n: int = 5,
                 seed: int = 0, eot: int | None = None, top_p: float = 1.0, logprobs: int = 0) -> Iterator[Step]:
        """Prefill the prompt in one pass, then one position per step from the KV cache."""
        cache = self.new_cache()
        inputs = list(prompt)
        for step in range(1, n_tokens + 1):
            last = self.logits(inputs, cache)[-1]
            token, prob = sample(last, temperature, top_n, uniform(seed, step), top_p)
            yield Step(step, token, prob, last, top_logprobs(last, temperature, logprobs) if logprobs else None)
            if token == eot:
                return
            inputs = [token]

    def score(self, ids: list[int], bos: int) -> list[float]:
        """Each token's log-probability given the tokens before it, the first given bos (<|endoftext|>)."""
        logits = self.logits([bos] + list(ids), self.new_cache())
        return [float(log_softmax(logits[p])[t]) for p, t in enumerate(ids)]

    def embed(self, ids: list[int], layer: int | None = None) -> np.ndarray:
        """The residual stream after block `layer` (after the last block and ln_f when None), averaged over the
        positions (in float64, as pgvector's avg sums)."""
        cache = self.new_cache()
        self.logits(ids, cache)
        x = layer_norm(cache[-1]["x"], **self.p["ln_f"]) if layer is None else cache[layer]["x"]
        return x.astype(np.float64).mean(axis=0).astype(np.float32)

    def classify(self, ids: list[int], choices: list[list[int]], bos: int) -> np.ndarray:
        """Each choice's probability after the text: the product of its tokens' probabilities, normalised over the
        choices (a softmax of their summed log-probabilities)."""
        sums = np.array([sum(self.score(list(ids) + list(c), bos)[len(ids):]) for c in choices])
        return np.exp(sums - sums.max()) / np.exp(sums - sums.max()).sum()
