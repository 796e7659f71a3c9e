"""The OpenAI API's shapes for `gpt-sql serve`: requests checked into plain values, and the response objects.

Only shapes live here: no database, no server. Field names, defaults and errors follow OpenAI's API reference for
the legacy completions, embeddings and models endpoints, so that the official clients work unchanged.
"""

from __future__ import annotations

import base64
import codecs
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .engine import GenerationError, Token, check_text

MAX_PROMPTS = 32  # prompts in one request: each becomes a sequence of one batched query
MAX_STOPS = 4  # as OpenAI
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # as OpenAI
DEFAULT_TOP_N = 40  # OpenAI samples the whole vocabulary; like llama.cpp's server, gpt-sql keeps the 40 likeliest
MIN_LOGPROB = -1e4  # JSON has no -Infinity: a probability that underflowed is reported as this


class ApiError(Exception):
    """A request refused: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str]
    max_tokens: int
    temperature: float  # as the query takes it: > 0 (OpenAI's 0, greedy, is top_n 1)
    top_n: int | None  # None: DEFAULT_TOP_N, capped at the vocabulary
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    logprobs: int | None  # None: no logprobs object in the response
    stream: bool
    include_usage: bool
    single: bool = field(default=True)  # the prompt was a string, not an array


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    base64: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model")
    return model


def _texts(value: Any, param: str, what: str) -> tuple[list[str], bool]:
    """A string or a non-empty array of strings; (the texts, whether it was one string)."""
    if isinstance(value, str):
        texts, single = [value], True
    elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        texts, single = list(value), False
    elif isinstance(value, list) and value and all(_is_int(t) or isinstance(t, list) for t in value):
        raise bad(f"{param} as token ids is not supported: give the text", param)
    else:
        raise bad(f"{param} must be a string or a non-empty array of strings", param)
    if len(texts) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} {what} in one request, got {len(texts)}", param)
    for k, t in enumerate(texts):
        try:
            check_text(t, f"{param}[{k}]" if not single else param)
        except GenerationError as e:
            raise bad(str(e), param) from None
    return texts, single


def _unsupported(body: dict) -> None:
    """OpenAI's parameters gpt-sql does not implement, refused unless they ask for the default."""
    defaults = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0}
    for name, default in defaults.items():
        if body.get(name) is not None and body.get(name) != default:
            raise bad(f"{name} is not supported by gpt-sql (only {default!r})", name)
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported by gpt-sql", "logit_bias")


def _model_and_texts(body: Any, field: str, plural: str) -> tuple[str, list[str], bool]:
    """What both endpoints take first: a JSON object naming a model, and its texts in `field` (one or a list)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = _model(body)
    if field not in body:
        raise bad(f"you must provide {'an' if field[0] in 'aeiou' else 'a'} {field} parameter", field)
    return (model, *_texts(body[field], field, plural))


def parse_completion(body: Any) -> CompletionRequest:
    model, prompts, single = _model_and_texts(body, "prompt", "prompts")
    _unsupported(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise bad(f"max_tokens must be a whole number of at least 1, got {max_tokens!r}", "max_tokens")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise bad(f"temperature must be a number between 0 and 2, got {temperature!r}", "temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 <= top_p <= 1:
        raise bad(f"top_p must be a number between 0 and 1, got {top_p!r}", "top_p")
    top_n = body.get("top_n")
    if top_n is not None and (not _is_int(top_n) or top_n < 1):
        raise bad(f"top_n must be a whole number of at least 1, got {top_n!r}", "top_n")
    if temperature == 0 or top_p == 0:  # greedy: the likeliest token at every step
        temperature, top_n, top_p = 1.0, 1, 1.0
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
        stops = tuple(stop)
    else:
        raise bad(f"stop must be a string or an array of at most {MAX_STOPS} strings", "stop")
    for s in stops:
        if s == "":
            raise bad("a stop string must not be empty", "stop")
        try:
            check_text(s, "a stop string")
        except GenerationError as e:
            raise bad(str(e), "stop") from None
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**63):
        raise bad("seed must be a whole number that fits in 64 bits", "seed")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise bad(f"logprobs must be a whole number between 0 and {MAX_LOGPROBS}, got {logprobs!r}", "logprobs")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = bool(options.get("include_usage"))
    return CompletionRequest(model, prompts, max_tokens, float(temperature), top_n, float(top_p), stops, seed,
                             logprobs, stream, include_usage, single)


def parse_embedding(body: Any) -> EmbeddingRequest:
    model, inputs, _ = _model_and_texts(body, "input", "inputs")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad("dimensions is not supported: gpt-sql's embeddings have the model's n_embd", "dimensions")
    return EmbeddingRequest(model, inputs, fmt == "base64")


# --- responses ---------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def logprob(p: float) -> float:
    return max(math.log(p), MIN_LOGPROB) if p > 0 else MIN_LOGPROB


class Choice:
    """One prompt's completion as its tokens arrive: the text (UTF-8 decoded across token boundaries, without
    <|endoftext|>), the logprobs object's lists, and the finish reason."""

    def __init__(self, index: int, prompt: str, max_tokens: int, eot: int, token_bytes: Callable[[int], bytes],
                 with_logprobs: bool):
        self.index, self.max_tokens, self.eot, self.token_bytes = index, max_tokens, eot, token_bytes
        self.with_logprobs = with_logprobs
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.offset = len(prompt)  # text_offset counts from the prompt's start, as OpenAI's does
        self.n_tokens = 0
        self.cut = False  # a stop string ended the completion inside its last token
        self.ended_by_eot = False
        self.done = False
        self.tokens: list[str] = []
        self.token_ids: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, t: Token) -> tuple[str, dict | None]:
        """The text this token adds, and its part of the logprobs object (None without logprobs)."""
        self.n_tokens += 1
        if t.token == self.eot:
            self.ended_by_eot, piece = True, self.decoder.decode(b"", final=True)
        else:
            self.cut = self.cut or len(t.bytes) < len(self.token_bytes(t.token))
            piece = self.decoder.decode(t.bytes)
        self.text += piece
        if self.n_tokens >= self.max_tokens or self.ended_by_eot:
            self.done = True
        if not self.with_logprobs:
            return piece, None
        text = t.bytes.decode("utf-8", errors="replace")
        top = {self.token_bytes(k).decode("utf-8", errors="replace"): max(lp, MIN_LOGPROB) for k, lp in (t.top or ())}
        part = {"tokens": [text], "token_ids": [t.token], "token_logprobs": [logprob(t.prob)], "top_logprobs": [top],
                "text_offset": [self.offset]}
        for key, values in part.items():
            getattr(self, key).extend(values)
        self.offset += len(piece)
        return piece, part

    def finish(self) -> tuple[str, str]:
        """The rest of the text (a character left incomplete) and the finish reason: 'stop' at <|endoftext|> or a
        stop string, 'length' at max_tokens."""
        self.done = True
        tail = self.decoder.decode(b"", final=True)
        self.text += tail
        stopped = self.ended_by_eot or self.cut or self.n_tokens < self.max_tokens
        return tail, "stop" if stopped else "length"

    def logprobs(self) -> dict | None:
        if not self.with_logprobs:
            return None
        return {"tokens": self.tokens, "token_ids": self.token_ids, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
    out = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def embeddings(model: str, vectors: list[np.ndarray], prompt_tokens: int, as_base64: bool) -> dict:
    def encode(v: np.ndarray) -> list[float] | str:
        if as_base64:  # what OpenAI's clients ask for by default: little-endian float32
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
        return [float(x) for x in v]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": k, "embedding": encode(v)} for k, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "gpt-sql"}
