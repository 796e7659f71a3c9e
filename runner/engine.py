"""Run generation, next-token and tokenization in SQL (streaming from a server-side cursor) or in NumPy."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import psycopg
from psycopg import sql

from . import queries
from .db import SESSION_SETTINGS
from .reference import Model, softmax, stop_at, top
from .tokenizer import Tokenizer, pretokenize
from ..loader.checkpoint import Checkpoint


@dataclass(frozen=True)
class Params:
    prompt: str
    tokens: int = 10
    temperature: float = 1.0
    top_n: int = 5
    seed: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int = 0

    def settings(self) -> dict[str, str | list]:
        return {"gpt.prompt": self.prompt, "gpt.tokens": str(self.tokens), "gpt.temperature": repr(self.temperature),
                "gpt.top_n": str(self.top_n), "gpt.seed": str(self.seed), **options(self)}


def options(p: "Params | Batch") -> dict[str, str | list]:
    """The settings of the generation options a Params and a Batch share: top_p, stop strings, logprobs."""
    return {"gpt.top_p": repr(p.top_p), "gpt.stop": list(p.stop), "gpt.logprobs": str(p.logprobs)}


@dataclass(frozen=True)
class Batch:
    """Several prompts generated together: the same parameters, a seed each (default: 0 for every one)."""
    prompts: list[str]
    tokens: int = 10
    temperature: float = 1.0
    top_n: int = 5
    seeds: list[int] | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int = 0

    def settings(self) -> dict[str, str | list]:
        """As settings: the prompts, seeds and stop strings as lists, which prepare() binds as arrays."""
        seeds = self.seeds if self.seeds is not None else [0] * len(self.prompts)
        return {"gpt.prompts": list(self.prompts), "gpt.tokens": str(self.tokens),
                "gpt.temperature": repr(self.temperature), "gpt.top_n": str(self.top_n), "gpt.seeds": list(seeds),
                **options(self)}

    def params(self, i: int) -> Params:
        """The single-prompt parameters of prompt i (from 1): what it gets alone."""
        seed = self.seeds[i - 1] if self.seeds is not None else 0
        return Params(self.prompts[i - 1], self.tokens, self.temperature, self.top_n, seed, self.top_p, self.stop,
                      self.logprobs)


@dataclass(frozen=True)
class Token:
    step: int
    token: int
    bytes: bytes
    prob: float
    top: tuple[tuple[int, float], ...] | None = None  # with logprobs: the likeliest tokens and their log-probabilities


def _top(alternatives: list[dict] | None) -> tuple[tuple[int, float], ...] | None:
    return None if alternatives is None else tuple((a["token"], a["logprob"]) for a in alternatives)


class GenerationError(Exception):
    """The query refused its parameters or failed on the server; the message is the server's."""


def check_text(text: str, name: str = "the prompt") -> None:
    """What PostgreSQL text cannot hold, refused before it reaches the server (psycopg would fail mid-dump)."""
    if not isinstance(text, str):
        raise GenerationError(f"{name} is not text")
    if "\x00" in text:
        raise GenerationError(f"{name} contains a NUL character, which PostgreSQL text cannot hold")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GenerationError(f"{name} is not valid UTF-8 (it holds a lone surrogate)") from None


def check_fits(conn: psycopg.Connection, model: str, prompts: list[str], new_tokens: int) -> None:
    """Refuse a long prompt that cannot fit n_ctx before the query tokenizes it (seconds for 100 KB): every
    pre-tokenizer piece is at least one token, and a token covers at most the longest token's bytes. Short
    prompts are left to the query, which gives the exact count. A batch's prompts are named by number, from 1."""
    names = ["the prompt"] if len(prompts) == 1 else [f"prompt {i}" for i in range(1, len(prompts) + 1)]
    for name, prompt in zip(names, prompts):
        check_text(prompt, name)
    longest = None
    m = sql.Identifier(model)
    try:
        n_ctx = conn.execute(sql.SQL("SELECT n_ctx FROM {}.hparams").format(m)).fetchone()[0]
        for name, prompt in zip(names, prompts):
            data = prompt.encode("utf-8")
            if len(data) <= n_ctx:
                continue
            if longest is None:
                longest = conn.execute(sql.SQL("SELECT max(length(bytes)) FROM {}.tokens").format(m)).fetchone()[0]
            at_least = sum(-(-len(piece.encode("utf-8")) // longest) for piece in pretokenize(prompt))
            if at_least + new_tokens > n_ctx:
                raise GenerationError(f"{name} is at least {at_least} tokens ({len(data)} bytes) and {new_tokens} new "
                                      f"tokens were asked for: together at most n_ctx = {n_ctx} fit")
    except psycopg.Error as e:
        raise GenerationError(e.diag.message_primary or str(e).strip().splitlines()[0]) from None


def prepare(conn: psycopg.Connection, model: str, settings: dict[str, str | list], timeout_s: float | None) -> None:
    """Session state for one query, all LOCAL to the transaction: user text goes in as bound values only (a list
    as an array, which the server writes as its text form, e.g. gpt.prompts)."""
    conn.execute(sql.SQL("SET LOCAL search_path = {}, public").format(sql.Identifier(model)))
    all_settings = {**SESSION_SETTINGS, **settings}
    if timeout_s:
        all_settings["statement_timeout"] = _timeout_ms(timeout_s)
    conn.execute("SELECT " + ", ".join(["set_config(%s, %s::text, true)"] * len(all_settings)),
                 [v for item in all_settings.items() for v in item])


def _timeout_ms(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds * 1000))}ms"  # 0 would mean no timeout at all


def _rows(conn: psycopg.Connection, model: str, kind: str, settings: dict[str, str],
          timeout_s: float | None = None, stream: bool = True) -> Iterator[tuple]:
    """Rows of one query variant; with `stream`, as the server produces them (a server-side cursor, one row
    per fetch), else all at once from a prepared statement. `timeout_s` bounds the whole query: each FETCH is
    a statement of its own, so statement_timeout is reset to what is left before each one."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        with conn.transaction():
            prepare(conn, model, settings, timeout_s)
            if stream:
                with conn.cursor(name=f"gpt_sql_{kind}") as cur:
                    cur.execute(queries.query(kind))
                    while True:
                        if deadline is not None:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                raise GenerationError(_timed_out(timeout_s))
                            conn.execute("SELECT set_config('statement_timeout', %s, true)", [_timeout_ms(left)])
                        row = cur.fetchone()
                        if row is None:
                            break
                        yield row
            else:
                yield from conn.execute(queries.query(kind), prepare=True).fetchall()
    except psycopg.errors.QueryCanceled as e:
        if "statement timeout" in (e.diag.message_primary or "") and timeout_s:
            raise GenerationError(_timed_out(timeout_s)) from None
        raise GenerationError("the query was cancelled (statement timeout or interrupt)") from None
    except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedObject) as e:
        # the query's helpers and types live in the model's schema: one loaded by an older gpt-sql lacks the newer ones
        raise GenerationError(f"model {model} was loaded by an older gpt-sql ({e.diag.message_primary}): load it "
                              f"again with `gpt-sql load DIR --name {model}`") from None
    except psycopg.Error as e:
        diag = e.diag.message_primary or str(e).strip().splitlines()[0]
        if conn.broken:  # the server went away (stopped, crashed, or this backend was terminated)
            raise GenerationError(f"lost the connection to the server during the query: {diag}") from None
        raise GenerationError(diag) from None


def _timed_out(timeout_s: float) -> str:
    return f"the query was cancelled after --timeout {timeout_s:g} s (statement timeout)"


def generate_sql(conn: psycopg.Connection, model: str, p: Params, timeout_s: float | None = None) -> Iterator[Token]:
    check_fits(conn, model, [p.prompt], p.tokens)
    for _, step, token, _, data, prob, top in _rows(conn, model, "generate", p.settings(), timeout_s):
        yield Token(step, token, bytes(data), prob, _top(top))


def generate_batch_sql(conn: psycopg.Connection, model: str, b: Batch,
                       timeout_s: float | None = None) -> Iterator[tuple[int, Token]]:
    """The prompts generated together by one query: (i, token) as they are produced, i the prompt's number from 1.
    A prompt is done at its last step (b.tokens) or at <|endoftext|>."""
    if not b.prompts:
        raise GenerationError("no prompts: give at least one")
    if b.seeds is not None and len(b.seeds) != len(b.prompts):
        raise GenerationError(f"{len(b.seeds)} seeds for {len(b.prompts)} prompts: give one seed per prompt")
    check_fits(conn, model, b.prompts, b.tokens)
    for i, step, token, _, data, prob, top in _rows(conn, model, "generate", b.settings(), timeout_s):
        yield i, Token(step, token, bytes(data), prob, _top(top))


def score_sql(conn: psycopg.Connection, model: str, text: str,
              timeout_s: float | None = None) -> list[tuple[int, float]]:
    """Each token of the text and its log-probability given the tokens before it (the first given <|endoftext|>)."""
    check_fits(conn, model, [text], 0)
    settings = {"gpt.prompt": text, "gpt.task": "score"}
    return [(token, logprob) for _, _, token, _, logprob in _rows(conn, model, "score", settings, timeout_s,
                                                                   stream=False)]


def embed_sql(conn: psycopg.Connection, model: str, text: str, layer: int | None = None,
              timeout_s: float | None = None) -> np.ndarray:
    """The text's mean residual stream after the last block and ln_f (after block `layer`, if given)."""
    check_fits(conn, model, [text], 0)
    settings = {"gpt.prompt": text, "gpt.task": "embed", "gpt.layer": "" if layer is None else str(layer)}
    (_, v), = _rows(conn, model, "embed", settings, timeout_s, stream=False)
    # a pgvector Vector where the connection registered the type, else its text form '[1,2,...]'
    return v.to_numpy() if hasattr(v, "to_numpy") else np.array(json.loads(v), dtype=np.float32)


def classify_sql(conn: psycopg.Connection, model: str, text: str, choices: list[str],
                 timeout_s: float | None = None) -> list[tuple[str, float]]:
    """Each choice and its probability after the text (normalised over the choices)."""
    check_fits(conn, model, [text, *choices], 0)
    settings = {"gpt.prompts": [text, *choices], "gpt.task": "classify"}
    return [(choice, prob) for _, choice, prob in _rows(conn, model, "classify", settings, timeout_s, stream=False)]


def next_sql(conn: psycopg.Connection, model: str, prompt: str, top: int, temperature: float,
             timeout_s: float | None = None) -> list[Token]:
    p = Params(prompt, tokens=1, temperature=temperature, top_n=top)
    check_fits(conn, model, [prompt], 1)
    return [Token(1, token, bytes(data), prob)
            for token, _, data, prob in _rows(conn, model, "next", p.settings(), timeout_s)]


def inspect_sql(conn: psycopg.Connection, model: str, prompt: str, timeout_s: float | None = None) -> dict:
    """The prompt's attention weights and logit lens, computed by the query's inspect variant: a dict like
    reference.Model.inspect's (numpy arrays)."""
    check_fits(conn, model, [prompt], 1)
    settings = {**Params(prompt, tokens=1, top_n=1).settings(), "gpt.inspect": "on"}
    rows = list(_rows(conn, model, "inspect", settings, timeout_s, stream=False))
    tokens = [token for _, token in sorted((r[3], r[4]) for r in rows if r[0] == "token")]
    lens = [r for r in rows if r[0] == "lens"]
    attention = [r for r in rows if r[0] == "attention"]
    n_layer, n_pos = 1 + max(r[1] for r in lens), len(tokens)
    n_head = 1 + max(r[2] for r in attention)
    weights = np.zeros((n_layer, n_head, n_pos, n_pos))
    for _, layer, head, pos, _, _, w in attention:
        weights[layer, head, pos, :len(w)] = w
    lens_tokens, lens_probs = np.zeros((n_layer, n_pos), dtype=np.int64), np.zeros((n_layer, n_pos))
    for _, layer, _, pos, token, prob, _ in lens:
        lens_tokens[layer, pos], lens_probs[layer, pos] = token, prob
    return {"tokens": tokens, "attention": weights, "lens_tokens": lens_tokens, "lens_probs": lens_probs}


def tokenize_sql(conn: psycopg.Connection, model: str, text: str,
                 timeout_s: float | None = None) -> list[tuple[int, bytes]]:
    check_text(text)
    return [(token, bytes(data))
            for _, token, data in _rows(conn, model, "tokenize", {"gpt.prompt": text}, timeout_s, stream=False)]


class NumpyEngine:
    """The NumPy reference over a checkpoint, with the SQL query's conventions (empty prompt, limits)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.tokenizer = Tokenizer(ckpt.encoder, ckpt.merges)
        self.model = Model(ckpt.hparams, ckpt.params, ckpt.dtype)
        self.eot = ckpt.encoder["<|endoftext|>"]

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt) or [self.eot]

    def check(self, p: Params, n_prompt: int) -> None:
        hp = self.ckpt.hparams
        if p.tokens < 1:
            raise GenerationError(f"gpt.tokens must be at least 1, got {p.tokens}")
        if not (p.temperature > 0 and p.temperature != float("inf")):
            raise GenerationError(f"gpt.temperature must be a positive number, got {p.temperature}")
        if not 1 <= p.top_n <= hp["n_vocab"]:
            raise GenerationError(f"gpt.top_n must be between 1 and {hp['n_vocab']} (the vocabulary), got {p.top_n}")
        if not 0 < p.top_p <= 1:
            raise GenerationError(f"gpt.top_p must be in (0, 1], got {p.top_p}")
        if not 0 <= p.logprobs <= hp["n_vocab"]:
            raise GenerationError(f"gpt.logprobs must be between 0 and {hp['n_vocab']} (the vocabulary), got "
                                  f"{p.logprobs}")
        if any(s == "" for s in p.stop):
            raise GenerationError(f"stop string {[s == '' for s in p.stop].index(True) + 1} is empty")
        if n_prompt + p.tokens > hp["n_ctx"]:
            raise GenerationError(f"the prompt is {n_prompt} tokens and {p.tokens} new tokens were asked for: "
                                  f"together at most n_ctx = {hp['n_ctx']} fit")

    def inspect(self, prompt: str) -> dict:
        ids = self.encode(prompt)
        self.check(Params(prompt, tokens=1), len(ids))
        return self.model.inspect(ids)

    def generate(self, p: Params) -> Iterator[Token]:
        """As the query: with stop strings, a generation ends at the token after which its text contains one, and
        its tokens end where the first one starts (the token it starts in cut there)."""
        ids = self.encode(p.prompt)
        self.check(p, len(ids))
        stops = [s.encode("utf-8") for s in p.stop]
        tokens, text = [], b""
        for s in self.model.generate(ids, p.tokens, p.temperature, p.top_n, p.seed, self.eot, p.top_p, p.logprobs):
            data = self.tokenizer.token_bytes(s.token)
            token = Token(s.step, s.token, data, s.prob, None if s.top is None else tuple(s.top))
            if not stops:
                yield token
                continue
            tokens.append(token)
            text += data
            if stop_at(text, stops) is not None:
                break
        cut, start = stop_at(text, stops), 0
        for t in tokens:
            if cut is not None and start >= cut:
                return
            yield t if cut is None or start + len(t.bytes) <= cut else replace(t, bytes=t.bytes[:cut - start])
            start += len(t.bytes)

    def next(self, prompt: str, n: int, temperature: float) -> list[Token]:
        """The n likeliest next tokens (ties: lower id first) and their probabilities, softmax(logits / temperature),
        as the query's `next` variant."""
        ids = self.encode(prompt)
        self.check(Params(prompt, tokens=1, temperature=temperature, top_n=n), len(ids))
        scaled = self.model.logits(ids, self.model.new_cache())[-1].astype(np.float64) / temperature
        probs = softmax(scaled)
        return [Token(1, int(t), self.tokenizer.token_bytes(int(t)), float(probs[t])) for t in top(scaled, n)]

    def tokenize(self, text: str) -> list[tuple[int, bytes]]:
        """The text's tokens and their bytes, as the query's `tokenize` variant (no tokens for an empty text)."""
        check_text(text)
        return [(t, self.tokenizer.token_bytes(t)) for t in self.tokenizer.encode(text)]

    def score(self, text: str) -> list[tuple[int, float]]:
        ids = self.tokenizer.encode(text)
        self._fits(len(ids) + 1, f"the text is {len(ids) + 1} tokens after <|endoftext|>")
        return list(zip(ids, self.model.score(ids, self.eot)))

    def embed(self, text: str, layer: int | None = None) -> np.ndarray:
        n_layer = self.ckpt.hparams["n_layer"]
        if layer is not None and not 0 <= layer < n_layer:
            raise GenerationError(f"gpt.layer must be between 0 and {n_layer - 1} (the blocks), got {layer}")
        ids = self.encode(text)
        self._fits(len(ids), f"the text is {len(ids)} tokens")
        return self.model.embed(ids, layer)

    def classify(self, text: str, choices: list[str]) -> list[tuple[str, float]]:
        if not choices:
            raise GenerationError("no choices: give at least one")
        if "" in choices:
            raise GenerationError(f"choice {choices.index('') + 1} is empty")
        ids, chosen = self.tokenizer.encode(text), [self.tokenizer.encode(c) for c in choices]
        for k, c in enumerate(chosen, 1):
            self._fits(len(ids) + 1 + len(c), f"the text with choice {k} is {len(ids) + 1 + len(c)} tokens after "
                                               f"<|endoftext|>")
        return list(zip(choices, map(float, self.model.classify(ids, chosen, self.eot))))

    def _fits(self, n: int, what: str) -> None:
        if n > self.ckpt.hparams["n_ctx"]:
            raise GenerationError(f"{what}: at most n_ctx = {self.ckpt.hparams['n_ctx']} fit")
