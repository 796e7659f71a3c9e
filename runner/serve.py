"""`gpt-sql serve`: an OpenAI-compatible API and a page that shows the model at work, on Starlette + uvicorn.

The API: GET /v1/models, POST /v1/completions (streamed as server-sent events with "stream": true), POST
/v1/embeddings. The page at / (runner/static/) streams completions from that API and asks /api/inspect for what
the model did at a token (the query's inspect variant) and /api/sql for the query a completion runs.
Every query goes through runner/engine.py, so user text reaches SQL only as bound settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import random
import socket
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable

import psycopg
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import openai_api as api
from . import queries
from .batcher import Batcher, Call, Cancelled, Connections, END, Job, Options
from .db import SESSION_SETTINGS
from .engine import GenerationError, Params, embed_sql, inspect_sql
from .models import model_names, read_vocabulary
from .tokenizer import Tokenizer

MAX_BODY = 1 << 20  # bytes of a request body
MAX_PENDING = 256  # prompts waiting for a connection; more are refused (503) rather than queued without bound
TOKENIZER_CACHE = 100_000  # words the tokenizer remembers, so that a long-running server's memory stays bounded
LOCAL_HOSTS = {"localhost"}


class ServeError(Exception):
    """The server cannot start as asked; the message says what to change."""


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ModelInfo:
    name: str
    n_ctx: int
    n_vocab: int
    n_layer: int
    n_head: int
    eot: int
    tokenizer: Tokenizer
    created: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # requests count tokens in threads of their own

    def count(self, text: str) -> int:
        """Tokens of a prompt as the query sees it (an empty one is <|endoftext|> alone)."""
        with self.lock:
            if len(self.tokenizer._cache) > TOKENIZER_CACHE:
                self.tokenizer._cache.clear()
            return max(1, len(self.tokenizer.encode(text)))

    def text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")


class Models:
    """The models served (--model, else every loaded one), with each one's tokenizer read once, for counting
    tokens and naming them. Catalog reads go over a connection of their own, never behind a generation."""

    def __init__(self, connect: Callable[[], psycopg.Connection], only: str | None):
        self._connect, self.only = connect, only
        self._conn: psycopg.Connection | None = None
        self._lock = asyncio.Lock()
        self._info: dict[str, ModelInfo] = {}

    def _query(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return fn(self._conn)

    async def names(self) -> list[str]:
        async with self._lock:
            loaded = await asyncio.to_thread(self._query, model_names)
        return [n for n in loaded if self.only is None or n == self.only]

    async def get(self, name: str) -> ModelInfo:
        names = await self.names()
        if name not in names:
            raise api.ApiError(404, f"the model '{name}' does not exist (served: {', '.join(names) or 'none'})",
                               "model", "model_not_found")
        async with self._lock:
            if name not in self._info:
                self._info[name] = await asyncio.to_thread(self._query, lambda c: _read_info(c, name))
            return self._info[name]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _read_info(conn: psycopg.Connection, name: str) -> ModelInfo:
    n_ctx, n_vocab, n_layer, n_head, eot = conn.execute(sql.SQL(
        "SELECT n_ctx, n_vocab, n_layer, n_head, eot FROM {}.hparams").format(sql.Identifier(name))).fetchone()
    return ModelInfo(name, n_ctx, n_vocab, n_layer, n_head, eot, Tokenizer(*read_vocabulary(conn, name)),
                     api.now())


# --- requests ----------------------------------------------------------------------------------------------

async def read_json(request: Request) -> Any:
    """The body as JSON, refused past MAX_BODY bytes without reading the rest. Only as application/json: a web
    page elsewhere cannot send that to this server without the browser asking first (CORS preflight), which this
    server does not answer, so a page the user visits cannot run queries here."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise api.ApiError(415, "send the request body as JSON, with 'Content-Type: application/json'")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise api.ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise api.ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise api.bad(f"the request body is not valid JSON ({e})") from None


async def watch_disconnect(request: Request, on_gone: Callable[[], None]) -> None:
    """Call on_gone when the client goes away (the body is read by then, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


def options_for(req: api.CompletionRequest, info: ModelInfo) -> Options:
    top_n = req.top_n if req.top_n is not None else min(api.DEFAULT_TOP_N, info.n_vocab)
    if top_n > info.n_vocab:
        raise api.bad(f"top_n must be at most {info.n_vocab} (the vocabulary), got {top_n}", "top_n")
    return Options(info.name, req.max_tokens, req.temperature, top_n, req.top_p, req.stop, req.logprobs or 0)


def check_context(req: api.CompletionRequest, info: ModelInfo) -> list[int]:
    """Each prompt's token count; refused when a prompt and max_tokens do not fit the model's context."""
    if req.max_tokens >= info.n_ctx:
        raise api.bad(f"max_tokens must be less than the model's context of {info.n_ctx} tokens, got "
                      f"{req.max_tokens}", "max_tokens")
    counts = []
    for k, prompt in enumerate(req.prompts):
        if len(prompt.encode("utf-8")) > 64 * info.n_ctx:  # no token is that long: refused before tokenizing
            raise api.bad(f"prompt {k} is far longer than the model's context of {info.n_ctx} tokens", "prompt")
        n = info.count(prompt)
        if n + req.max_tokens > info.n_ctx:
            raise api.bad(f"this model's maximum context length is {info.n_ctx} tokens, however you requested "
                          f"{n + req.max_tokens} tokens ({n} in prompt {k}, {req.max_tokens} for the completion)",
                          "max_tokens" if n < info.n_ctx else "prompt")
        counts.append(n)
    return counts


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class App:
    """The server's state and its endpoints."""

    def __init__(self, connect: Callable[[], psycopg.Connection], model: str | None, api_key: str | None,
                 workers: int):
        self.connect, self.api_key, self.workers = connect, api_key, workers
        self.models = Models(connect, model)
        self.connections: Connections | None = None
        self.batcher: Batcher | None = None
        self._serving: asyncio.Task | None = None

    async def startup(self) -> None:
        self.connections = Connections(self.connect, self.workers)
        self.batcher = Batcher(self.connections)
        self._serving = asyncio.get_running_loop().create_task(self.batcher.serve())

    async def shutdown(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.connections is not None:
            await asyncio.to_thread(self.connections.close)
        self.models.close()

    def authorized(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise api.ApiError(401, "you didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise api.ApiError(401, "incorrect API key provided", code="invalid_api_key")

    # --- endpoints -------------------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        self.authorized(request)
        infos = [await self.models.get(n) for n in await self.models.names()]
        return JSONResponse({"object": "list", "data": [api.model_object(i.name, i.created) for i in infos]})

    async def get_model(self, request: Request) -> Response:
        self.authorized(request)
        info = await self.models.get(request.path_params["name"])
        return JSONResponse(api.model_object(info.name, info.created))

    async def completions(self, request: Request) -> Response:
        self.authorized(request)
        req = api.parse_completion(await read_json(request))
        info = await self.models.get(req.model)
        options = options_for(req, info)
        counts = await asyncio.to_thread(check_context, req, info)
        if self.batcher.pending_prompts() + len(req.prompts) > MAX_PENDING:
            raise api.ApiError(503, "the server is busy: too many prompts are waiting; try again later",
                               type="server_error", code="overloaded")
        seeds = [req.seed if req.seed is not None else random.randrange(2**31) for _ in req.prompts]
        job = Job(options, req.prompts, seeds)
        self.batcher.submit(job)
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(request, lambda: self.batcher.leave(job)))
        choices = [api.Choice(k, p, req.max_tokens, info.eot, info.tokenizer.token_bytes, req.logprobs is not None)
                   for k, p in enumerate(req.prompts)]
        id_, created = api.new_id("cmpl"), api.now()
        if req.stream:
            return StreamingResponse(self._stream(job, watcher, choices, id_, created, req, sum(counts)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for k, _, _ in self._tokens(job, choices):
                pass
            out = []
            for c in choices:
                _, reason = c.finish()
                out.append(api.choice(c.index, c.text, reason, c.logprobs()))
        finally:
            watcher.cancel()
            self.batcher.leave(job)
        # how many prompts its query ran, this request's and those gathered with it
        headers = {"X-GPT-SQL-Batch-Prompts": str(sum(len(j.prompts) for j in job.group.jobs))} if job.group else None
        return JSONResponse(api.completion(id_, created, info.name, out,
                                           api.usage(sum(counts), sum(c.n_tokens for c in choices))), headers=headers)

    async def _tokens(self, job: Job, choices: list[api.Choice]) -> AsyncIterator[tuple[int, str, dict | None]]:
        """(prompt index, text added, logprobs part) per token, until the query ends; its error as an ApiError."""
        while True:
            item = await job.events.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise api.ApiError(500, f"the query failed: {item}", type="server_error")
            k, token = item
            piece, part = choices[k].add(token)
            yield k, piece, part

    async def _stream(self, job: Job, watcher: asyncio.Task, choices: list[api.Choice], id_: str, created: int,
                      req: api.CompletionRequest, prompt_tokens: int) -> AsyncIterator[bytes]:
        model = job.options.model

        def chunk(k: int, text: str, reason: str | None, part: dict | None) -> bytes:
            return sse(api.completion(id_, created, model, [api.choice(k, text, reason, part)], None))

        try:
            try:
                async for k, piece, part in self._tokens(job, choices):
                    yield chunk(k, piece, None, part)
                    if choices[k].done and not req.stop:  # its last token: no stop string can cut it any more
                        tail, reason = choices[k].finish()
                        yield chunk(k, tail, reason, None)
                for c in choices:
                    if c.n_tokens == 0 or not (c.done and not req.stop):
                        tail, reason = c.finish()
                        yield chunk(c.index, tail, reason, None)
            except api.ApiError as e:
                yield sse(e.body())
                return
            if req.include_usage:
                out = api.completion(id_, created, model, [], api.usage(prompt_tokens,
                                                                         sum(c.n_tokens for c in choices)))
                yield sse(out)
            yield sse("[DONE]")
        finally:
            watcher.cancel()
            self.batcher.leave(job)

    async def embeddings(self, request: Request) -> Response:
        self.authorized(request)
        req = api.parse_embedding(await read_json(request))
        info = await self.models.get(req.model)
        counts = []
        for k, text in enumerate(req.inputs):
            n = await asyncio.to_thread(info.count, text)
            if n > info.n_ctx:
                raise api.bad(f"input {k} is {n} tokens: at most the model's context of {info.n_ctx} fit", "input")
            counts.append(n)
        vectors = await self._call(request, lambda conn: [embed_sql(conn, info.name, t) for t in req.inputs])
        if isinstance(vectors, Response):
            return vectors
        return JSONResponse(api.embeddings(info.name, vectors, sum(counts), req.base64))

    async def _call(self, request: Request, fn: Callable[[psycopg.Connection], Any]) -> Any:
        """fn(conn) on a pooled connection, cancelled if the client goes away; its refusal as a 400."""
        call = Call()
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(watch_disconnect(request, lambda: loop.create_task(asyncio.to_thread(call.cancel))))
        try:
            return await self.connections.call(fn, call)
        except Cancelled:
            return Response(status_code=499)  # nobody reads it
        except GenerationError as e:
            raise api.bad(str(e)) from None
        finally:
            watcher.cancel()

    async def inspect(self, request: Request) -> Response:
        """What the model did at a position: the attention of the last position over the ones before it, and the
        logit lens, from the query's inspect variant on the prompt followed by the given tokens."""
        self.authorized(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise api.bad("the request body must be a JSON object")
        info = await self.models.get(api._model(body))
        prompt = body.get("prompt", "")
        tokens = body.get("tokens", [])
        if not isinstance(prompt, str):
            raise api.bad("prompt must be a string", "prompt")
        if not isinstance(tokens, list) or not all(api._is_int(t) and 0 <= t < info.n_vocab for t in tokens):
            raise api.bad(f"tokens must be an array of token ids below {info.n_vocab}", "tokens")
        text = prompt + info.tokenizer.decode_bytes([t for t in tokens if t != info.eot]).decode("utf-8", "replace")
        api._texts(text, "prompt", "prompts")
        result = await self._call(request, lambda conn: inspect_sql(conn, info.name, text))
        if isinstance(result, Response):
            return result
        ids = result["tokens"]
        last = len(ids) - 1
        settings = {**SESSION_SETTINGS, **Params(text, tokens=1, top_n=1).settings(), "gpt.inspect": "on"}
        return JSONResponse({
            "model": info.name, "text": text,
            "tokens": [{"id": t, "text": info.text(t)} for t in ids],
            # [layer][head][key]: the last position's attention over every position up to it
            "attention": result["attention"][:, :, last, :last + 1].round(5).tolist(),
            # [layer][position]: the likeliest next token after each block
            "lens": [[{"id": int(t), "text": info.text(int(t)), "prob": round(float(p), 5)}
                      for t, p in zip(ts, ps)] for ts, ps in zip(result["lens_tokens"], result["lens_probs"])],
            "sql": {"settings": settings, "query": queries.query("inspect")}})

    async def query(self, request: Request) -> Response:
        """The query a completion request runs and the settings it binds (its own prompts; a batch it joins adds
        other requests' prompts to gpt.prompts and gpt.seeds)."""
        self.authorized(request)
        req = api.parse_completion(await read_json(request))
        info = await self.models.get(req.model)
        options = options_for(req, info)
        seeds = [req.seed if req.seed is not None else 0 for _ in req.prompts]
        settings = {**SESSION_SETTINGS, **options.batch(req.prompts, seeds).settings()}
        return JSONResponse({"settings": settings, "query": queries.query("generate")})

    async def page(self, request: Request) -> Response:
        return FileResponse(static_dir() / "index.html", headers={"Cache-Control": "no-cache"})


def static_dir():
    return resources.files("gpt_sql.runner") / "static"


async def api_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, api.ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
    return JSONResponse(api.error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    message = "not found" if status == 404 else getattr(exc, "detail", "error")
    return JSONResponse(api.error_body(f"{request.method} {request.url.path}: {message}", "invalid_request_error"),
                        status_code=status)


class LocalHostsOnly:
    """On a loopback address, refuse requests whose Host is not a loopback name: a site whose name an attacker
    points at 127.0.0.1 (DNS rebinding) would otherwise be same-origin with this server in the user's browser."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]") not in ("localhost", "127.0.0.1", "::1"):
                body = api.error_body(f"Host {host!r} is not this machine's: use http://127.0.0.1/",
                                      "invalid_request_error")
                await JSONResponse(body, status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(connect: Callable[[], psycopg.Connection], model: str | None = None, api_key: str | None = None,
             workers: int = 2) -> Starlette:
    a = App(connect, model, api_key, workers)
    routes = [
        Route("/", a.page),
        Route("/v1/models", a.list_models),
        Route("/v1/models/{name:path}", a.get_model),
        Route("/v1/completions", a.completions, methods=["POST"]),
        Route("/v1/embeddings", a.embeddings, methods=["POST"]),
        Route("/api/inspect", a.inspect, methods=["POST"]),
        Route("/api/sql", a.query, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(static_dir())), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await a.startup()
        try:
            yield
        finally:
            await a.shutdown()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={api.ApiError: api_error, 404: not_found, 405: not_found,
                                        Exception: api_error})
    app.state.server = a
    return app


# --- running ---------------------------------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so that a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot listen on {host}: {e.strerror}") from None
    sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(infos[0][4])
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run(connect: Callable[[], psycopg.Connection], host: str, port: int, model: str | None, api_key: str | None,
        insecure: bool, workers: int = 2, announce: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C (or SIGTERM). Beyond localhost, only with an API key unless `insecure`."""
    import uvicorn

    if not is_local(host) and api_key is None and not insecure:
        raise ServeError(f"--host {host} reaches beyond this machine: give --api-key KEY (or, to serve anyone who "
                         f"can reach it, --insecure-no-api-key)")
    sock = listen(host, port)
    app = make_app(connect, model, api_key, workers)
    config = uvicorn.Config(LocalHostsOnly(app) if is_local(host) else app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2,
                            lifespan="on")
    server = uvicorn.Server(config)

    async def main() -> None:
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            announce(f"http://{shown}:{bound_port}/")
        await serving

    try:
        asyncio.run(main())
    finally:
        sock.close()
