"""`gpt-sql`: run GPT-2 inside PostgreSQL from the command line."""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, TypeVar

import psycopg
from psycopg import sql

from . import queries
from .db import (DatabaseError, connect, embedded_uri, fit_shared_buffers, free_disk, memory_available, pgdata_dir,
                 resolve_dsn, shared_buffers_hint, shared_buffers_status, stop_embedded)
from .firstrun import choose_model
from .progress import waiting
from .grant import GrantError, grant
from . import inspect_view
from .batch import BatchFileError, check_lengths, completions_numpy, open_items, run_jobs
from . import fill
from .engine import (Batch, GenerationError, NumpyEngine, Params, check_text, classify_sql, embed_sql,
                     generate_sql, inspect_sql, next_sql, score_sql, tokenize_sql)
from .models import ModelError, list_models, read_model, resolve_model
from .models import model_names as list_models_names
from ..loader.checkpoint import (DTYPES, CheckpointError, as_dtype, check_room, open_checkpoint, read_checkpoint,
                                 read_hparams)
from ..loader.load import LoadError, drop, load

USER_ERRORS = (DatabaseError, GenerationError, ModelError, CheckpointError, LoadError, GrantError,
               inspect_view.InspectViewError, BatchFileError, fill.FillError)


T = TypeVar("T")


class UsageError(Exception):
    pass


def checked(parse: Callable[[str], T], ok: Callable[[T], bool], rule: str, kind: str) -> Callable[[str], T]:
    """An argparse type: the text parsed as `kind`, and refused in one line unless `ok`, saying the rule."""
    def convert(s: str) -> T:
        try:
            v = parse(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{rule}, got {s}")
        return v
    return convert


positive_int = checked(int, lambda v: v >= 1, "must be at least 1", "a whole number")
non_negative_int = checked(int, lambda v: v >= 0, "must be at least 0", "a whole number")
seed_int = checked(int, lambda v: -2**63 <= v < 2**63, "must fit in 64 bits (PostgreSQL bigint)", "a whole number")
temperature = checked(float, lambda v: v > 0 and math.isfinite(v), "must be a positive finite number", "a number")
timeout_seconds = temperature  # the same rule: a positive finite number
top_p = checked(float, lambda v: 0 < v <= 1, "must be in (0, 1]", "a number")


def nonempty(what: str) -> Callable[[str], str]:
    """An argparse type for text that must not be empty (a stop string, a choice): `prompt_text`'s rules besides."""
    def convert(s: str) -> str:
        if not s:
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        return prompt_text(s)
    return convert


stop_text, choice_text = nonempty("a stop string"), nonempty("a choice")


def prompt_text(s: str) -> str:
    """Command-line bytes that are not UTF-8 arrive as surrogate escapes; refuse them rather than guess."""
    try:
        check_text(s)
    except GenerationError as e:
        raise argparse.ArgumentTypeError(str(e))
    return s


def default_name(path: Path) -> str:
    name = "".join(c if c.isalnum() else "_" for c in path.resolve().name.lower()).strip("_") or "model"
    return name if not name[0].isdigit() else f"gpt2_{name}"


# --- commands ---------------------------------------------------------------------------------------------

def cmd_run(a: argparse.Namespace) -> int:
    if (a.prompt is None) == (a.batch is None):
        raise UsageError("give a PROMPT, or --batch FILE for many")
    if a.batch is None and a.jobs != 1:
        raise UsageError("--jobs goes with --batch")
    if a.batch is not None and a.json:
        raise UsageError("--batch already prints JSON, one line per completion; leave out --json")
    seed = a.seed if a.seed is not None else random.randrange(2**31)
    if a.batch is not None:
        return _run_batch(a, seed)
    p = Params(a.prompt, a.tokens, a.temperature, a.top_n, seed, a.top_p, tuple(a.stop or ()), a.logprobs)
    if a.engine == "numpy":
        engine = NumpyEngine(_numpy_checkpoint(a))
        stream = engine.generate(p)
    else:
        conn, model = _run_model(a)
        stream = generate_sql(conn, model, p, timeout_s=a.timeout)
    # The first token first: a refused parameter or a too long prompt fails before anything is printed.
    stream = iter(stream)
    with waiting("reading the prompt", enabled=sys.stderr.isatty() and not a.json):
        first = next(stream, None)
    tokens = itertools.chain([first] if first is not None else [], stream)
    if a.json:
        tokens = list(tokens)
        data = b"".join(t.bytes for t in tokens)
        prompt_ids = (engine.encode(a.prompt) if a.engine == "numpy"
                      else _sql_prompt_ids(conn, model, a.prompt, a.timeout))
        out = {"prompt_tokens": prompt_ids, "tokens": [t.token for t in tokens],
               "text": data.decode("utf-8", errors="replace"), "seed": seed}
        if a.logprobs:
            out["top_logprobs"] = [[{"token": k, "logprob": lp} for k, lp in t.top] for t in tokens]
        print(json.dumps(out, ensure_ascii=False))
        return 0
    out = sys.stdout
    out.write(a.prompt)
    out.flush()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in tokens:
        out.write(decoder.decode(t.bytes))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    return 0


def _run_model(a: argparse.Namespace) -> tuple[psycopg.Connection, str]:
    """The connection and model `run` uses: --model, a loaded one, or one loaded now (then, as `gpt-sql load`
    does, shared buffers sized for it on the embedded server)."""
    conn = connect(a.dsn)
    model, loaded = choose_model(conn, a.model)
    if loaded and resolve_dsn(a.dsn) is None:
        note = fit_shared_buffers(conn)
        if note:
            print(f"gpt-sql: {note}", file=sys.stderr)
            conn = connect(a.dsn)  # a restart closed this session
    return conn, model


def _run_batch(a: argparse.Namespace, seed: int) -> int:
    """Each completion as one JSON line when its sequence ends; a progress bar over all tokens on a terminal."""
    from tqdm import tqdm

    items = open_items(a.batch, sys.stdin)
    options = Batch([], a.tokens, a.temperature, a.top_n, None, a.top_p, tuple(a.stop or ()), a.logprobs)
    bar = tqdm(total=len(items) * a.tokens, unit="token", file=sys.stderr, disable=not sys.stderr.isatty(),
               desc=f"{len(items)} prompts", dynamic_ncols=True)
    if a.engine == "numpy":
        stream = completions_numpy(NumpyEngine(_numpy_checkpoint(a)), items, options, seed,
                                   on_token=lambda: bar.update())
    else:
        conn, model = _run_model(a)
        if a.jobs > 1:  # one job's query must not start generating before another's finds a prompt too long
            check_lengths(conn, model, items, a.tokens)
        stream = run_jobs(lambda: connect(a.dsn) if a.jobs > 1 else conn, model, items, a.jobs, options, seed,
                          timeout_s=a.timeout, on_token=lambda: bar.update())
    try:
        for c in stream:
            bar.update(a.tokens - len(c.tokens))  # ended early, at <|endoftext|> or a stop string
            bar.write(c.json(), file=sys.stdout)
            sys.stdout.flush()
    finally:
        bar.close()
    return 0


def _sql_prompt_ids(conn: psycopg.Connection, model: str, prompt: str, timeout: float | None) -> list[int]:
    """The prompt's tokens as the query sees them: an empty prompt is <|endoftext|> alone, as with NumPy."""
    ids = [t for t, _ in tokenize_sql(conn, model, prompt, timeout_s=timeout)]
    if not ids:
        ids = [conn.execute(sql.SQL("SELECT eot FROM {}.hparams").format(sql.Identifier(model))).fetchone()[0]]
    return ids


def _numpy_checkpoint(a: argparse.Namespace):
    if a.checkpoint:
        return read_checkpoint(a.checkpoint)
    conn = connect(a.dsn)
    model = resolve_model(conn, a.model)
    with conn.transaction():  # one version: the first read locks its hparams, so a reload waits for the rest
        return read_model(conn, model)


def _model_or_engine(a: argparse.Namespace) -> tuple[NumpyEngine | None, psycopg.Connection | None, str | None]:
    """What score, embed and classify compute with: the NumPy reference, or a connection and its model."""
    if a.engine == "numpy":
        return NumpyEngine(_numpy_checkpoint(a)), None, None
    conn = connect(a.dsn)
    return None, conn, resolve_model(conn, a.model)


def cmd_score(a: argparse.Namespace) -> int:
    engine, conn, model = _model_or_engine(a)
    with waiting("scoring", enabled=sys.stderr.isatty() and not a.json):
        scores = engine.score(a.text) if engine else score_sql(conn, model, a.text, timeout_s=a.timeout)
    perplexity = math.exp(-sum(lp for _, lp in scores) / len(scores)) if scores else None
    if a.json:
        print(json.dumps({"tokens": [t for t, _ in scores], "logprobs": [lp for _, lp in scores],
                          "perplexity": perplexity}))
        return 0
    texts = _token_texts(engine, conn, model, [t for t, _ in scores])
    for token, logprob in scores:
        print(f"{logprob:10.4f}  {token:>6}  {texts[token]!r}")
    print(f"perplexity {perplexity:.4f}" if perplexity is not None else "perplexity: no tokens")
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    engine, conn, model = _model_or_engine(a)
    if engine:
        v = engine.embed(a.text, a.layer)
    else:
        v = embed_sql(conn, model, a.text, a.layer, timeout_s=a.timeout)
    print(json.dumps([float(x) for x in v]))
    return 0


def cmd_classify(a: argparse.Namespace) -> int:
    engine, conn, model = _model_or_engine(a)
    probs = engine.classify(a.text, a.choices) if engine else classify_sql(conn, model, a.text, a.choices,
                                                                            timeout_s=a.timeout)
    if a.json:
        print(json.dumps(dict(probs), ensure_ascii=False))
        return 0
    for choice, prob in sorted(probs, key=lambda c: -c[1]):
        print(f"{prob:8.4f}  {choice}")
    return 0


def _token_texts(engine: NumpyEngine | None, conn: psycopg.Connection | None, model: str | None,
                 ids: list[int]) -> dict[int, str]:
    """Each token's text (U+FFFD for a character cut between tokens), from the tokenizer or the model's tokens."""
    if engine:
        found = {t: engine.tokenizer.token_bytes(t) for t in ids}
    else:
        found = dict(conn.execute(sql.SQL("SELECT id, bytes FROM {}.tokens WHERE id = ANY(%s)").format(
            sql.Identifier(model)), [sorted(set(ids))]).fetchall())
    return {t: bytes(b).decode("utf-8", errors="replace") for t, b in found.items()}


def cmd_next(a: argparse.Namespace) -> int:
    engine, conn, model = _model_or_engine(a)
    results = {t: engine.next(a.prompt, a.top, t) if engine else next_sql(conn, model, a.prompt, a.top, t,
                                                                            timeout_s=a.timeout)
               for t in a.temperature}
    if a.json:
        print(json.dumps({str(t): [{"token": c.token, "text": c.bytes.decode("utf-8", errors="replace"),
                                    "prob": c.prob} for c in cands] for t, cands in results.items()},
                         ensure_ascii=False))
        return 0
    for t, cands in results.items():
        print(f"temperature {t:g}:")
        for c in cands:
            print(f"  {c.prob:8.4f}  {c.token:>6}  {c.bytes.decode('utf-8', errors='replace')!r}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    if a.engine == "numpy":
        engine = NumpyEngine(_numpy_checkpoint(a))
        result = engine.inspect(a.prompt)
        token_bytes = engine.tokenizer.token_bytes
    else:
        conn = connect(a.dsn)
        model, loaded = choose_model(conn, a.model)
        if loaded and resolve_dsn(a.dsn) is None:
            note = fit_shared_buffers(conn)
            if note:
                print(f"gpt-sql: {note}", file=sys.stderr)
                conn = connect(a.dsn)
        with waiting("looking inside", enabled=sys.stderr.isatty() and not a.json):
            result = inspect_sql(conn, model, a.prompt, timeout_s=a.timeout)
        ids = sorted(set(result["tokens"]) | set(result["lens_tokens"].flatten().tolist()))
        found = dict(conn.execute(sql.SQL("SELECT id, bytes FROM {}.tokens WHERE id = ANY(%s)").format(
            sql.Identifier(model)), [ids]).fetchall())
        token_bytes = lambda t: bytes(found[t])  # noqa: E731
    data = {"tokens": result["tokens"], "attention": result["attention"].tolist(),
            "lens": [[{"token": int(t), "prob": float(p)} for t, p in zip(ts, ps)]
                     for ts, ps in zip(result["lens_tokens"], result["lens_probs"])]}
    def text_of(token: int) -> str:
        return token_bytes(token).decode("utf-8", errors="replace")
    if a.png:
        _write_png(data, text_of, Path(a.png))
    if a.json:
        print(json.dumps(data))
    else:
        print(inspect_view.render_terminal(data, text_of))
    return 0


def _write_png(data: dict, text_of: Callable[[int], str], path: Path) -> None:
    """Drawn beside its destination, then moved in place: a failure leaves no partial picture."""
    if not path.parent.is_dir():
        raise UsageError(f"--png {path}: no such directory {path.parent}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
    try:
        inspect_view.render_png(data, text_of, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"gpt-sql: wrote {path}", file=sys.stderr)


def cmd_tokenize(a: argparse.Namespace) -> int:
    engine, conn, model = _model_or_engine(a)

    def tokenize(text: str) -> list[tuple[int, bytes]]:
        return engine.tokenize(text) if engine else tokenize_sql(conn, model, text, timeout_s=a.timeout)

    if a.jsonl:
        for n, line in enumerate(sys.stdin, 1):
            try:
                text = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"stdin line {n}: not JSON ({e.msg})")
            if not isinstance(text, str):
                raise UsageError(f"stdin line {n}: expected a JSON string")
            try:
                ids = [t for t, _ in tokenize(text)]
            except GenerationError as e:
                raise UsageError(f"stdin line {n}: {e}")
            print(json.dumps(ids))
        return 0
    if a.text is None:
        raise UsageError("give TEXT, or --jsonl to read JSON strings from stdin")
    for token, data in tokenize(a.text):
        print(f"{token:>6}  {data.decode('utf-8', errors='replace')!r}")
    return 0


def cmd_sql(a: argparse.Namespace) -> int:
    sys.stdout.write(queries.query(a.variant))
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    models = list_models(connect(a.dsn))
    if a.json:
        print(json.dumps([m.__dict__ for m in models]))
        return 0
    if not models:
        print("no models loaded; try `gpt-sql download 124M` or `gpt-sql load PATH`")
        return 0
    print(f"{'schema':<20} {'params':>12} {'layers':>6} {'heads':>5} {'embd':>5} {'ctx':>5} {'vocab':>6} "
          f"{'dtype':>7} {'size':>9}  source")
    for m in models:
        print(f"{m.name + ('*' if m.older_layout else ''):<20} {m.n_params:>12,} {m.n_layer:>6} {m.n_head:>5} "
              f"{m.n_embd:>5} {m.n_ctx:>5} {m.n_vocab:>6} {m.dtype:>7} {m.size_bytes / 2**20:>7.1f}MB  {m.source}")
    if any(m.older_layout for m in models):
        print("* loaded by an earlier gpt-sql: it works, in slower tables; `gpt-sql load` it again to update them")
    return 0


def cmd_load(a: argparse.Namespace) -> int:
    path = Path(a.path)
    embedded = resolve_dsn(a.dsn) is None
    hp = read_hparams(path)
    if hp is not None:  # refuse early what cannot fit, rather than be killed half-way for lack of memory
        check_room(hp, a.dtype, memory_available(), free_disk(pgdata_dir()) if embedded else None)
    ckpt = as_dtype(open_checkpoint(path), a.dtype)  # each tensor is read as the load copies it, then let go
    name = a.name or default_name(path)
    conn = connect(a.dsn)
    counts = load(conn, ckpt, name)
    print(f"loaded {name}: {ckpt.n_params:,} parameters ({a.dtype}), {sum(counts.values()):,} rows")
    note = fit_shared_buffers(conn) if embedded else shared_buffers_hint(conn)  # ours to size; else a hint
    if note:
        print(note)
    return 0


def cmd_drop(a: argparse.Namespace) -> int:
    drop(connect(a.dsn), a.name)
    print(f"dropped {a.name}")
    return 0


def cmd_grant(a: argparse.Namespace) -> int:
    if a.login and not a.create:
        raise UsageError("--login goes with --create (for an existing role: ALTER ROLE ... LOGIN)")
    models = grant(connect(a.dsn), a.role, a.model, create=a.create, login=a.login, future=a.future)
    made = f"created role {a.role} ({'LOGIN' if a.login else 'NOLOGIN'}); " if a.create else ""
    print(f"{made}{a.role} may run {', '.join(models) if models else 'no model (none is loaded)'}"
          f"{' and models loaded later by this role' if a.future else ''}; it cannot load or change them")
    return 0


def role_name(s: str) -> str:
    if not s or "\x00" in s:
        raise argparse.ArgumentTypeError("expected a role name")
    return s


def cmd_download(a: argparse.Namespace) -> int:
    from ..loader.download import DownloadError, default_cache_dir, download

    try:
        path = download(a.size, Path(a.cache) if a.cache else default_cache_dir(), progress=sys.stderr.isatty())
    except DownloadError as e:
        raise UsageError(str(e))
    print(path)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import ServeError, run as serve

    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {a.port}")
    conn, model = _run_model(a)  # a model to serve, loaded now if none is (as `run` does)
    served = [model] if a.model else list_models_names(conn)
    conn.close()
    try:
        serve(lambda: connect(a.dsn), a.host, a.port, a.model, a.api_key, a.insecure_no_api_key,
              workers=max(1, min(4, os.cpu_count() or 1)),
              announce=lambda url: print(f"gpt-sql: serving {', '.join(served)} at {url}  (OpenAI API: {url}v1; "
                                         f"Ctrl-C stops)", flush=True))
    except ServeError as e:
        raise UsageError(str(e))
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then raised the Ctrl-C it caught again: not an error here
        pass
    print("gpt-sql: stopped", file=sys.stderr)
    return 0


def cmd_server(a: argparse.Namespace) -> int:
    if a.action == "start":
        print(embedded_uri(start=True))
    elif a.action == "status":
        uri = embedded_uri(start=False)
        print(f"running: {uri}" if uri else f"not running (data in {pgdata_dir()})")
        if uri:
            with psycopg.connect(uri, autocommit=True) as conn:
                print(shared_buffers_status(conn).describe())
    else:
        print("stopped" if stop_embedded() else "was not running")
    return 0


def cmd_fill(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    if a.task == "classify" and not a.choices:
        raise UsageError("classify needs --choices")
    if a.task != "classify" and a.choices:
        raise UsageError("--choices goes with classify")
    if a.task != "embed" and a.layer is not None:
        raise UsageError("--layer goes with embed")
    sampling = fill.Sampling(a.tokens, a.temperature, a.top_n, a.top_p, tuple(a.stop or ()), a.seed)
    task = fill.Task(a.task, sampling, a.layer, tuple(a.choices or ()))
    connect_compute = (lambda: connect(a.compute_dsn)) if a.compute_dsn else None
    stop = threading.Event()
    bars = []  # made once the rows to visit are counted, so that it shows the ETA from the start

    def start(total: int) -> None:
        bars.append(tqdm(total=total, unit="row", file=sys.stderr, disable=not sys.stderr.isatty(),
                         desc=f"fill {a.into}", dynamic_ncols=True))

    def interrupt(signum, frame) -> None:  # the first Ctrl-C ends the run after the batches in flight; a second, now
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("gpt-sql: stopping after the batch in flight (Ctrl-C again to stop now)", file=sys.stderr)

    before = signal.signal(signal.SIGINT, interrupt)
    try:
        summary = fill.fill(lambda: connect(a.dsn), connect_compute, task, a.table, a.text, a.into, a.key, a.model,
                            a.jobs, a.batch, on_start=start, on_rows=lambda n: bars[0].update(n), stop=stop)
    finally:
        signal.signal(signal.SIGINT, before)
        for bar in bars:
            bar.close()
    print(summary.json() if a.json else summary.line())
    if summary.interrupted:
        print(f"gpt-sql: interrupted: filled {summary.filled} of {summary.total} rows; the same command fills the "
              f"rest", file=sys.stderr)
        return 130
    return 0


# --- argument parsing -------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """Usage mistakes as one line, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="gpt-sql", description="GPT-2 inference inside PostgreSQL, as one recursive SQL query.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, db: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if db:
            p.add_argument("--dsn", help="PostgreSQL connection string (default: $DATABASE_URL, PG* variables, "
                                         "else a private embedded server)")
        return p

    def engine_options(p: argparse.ArgumentParser) -> None:
        """Where a command computes (the query, or the NumPy reference on the same weights), and its time limit."""
        p.add_argument("--engine", choices=("sql", "numpy"), default="sql", help="where to compute (default sql)")
        p.add_argument("--checkpoint", help="with --engine numpy: read this checkpoint dir instead of the database")
        p.add_argument("--timeout", type=timeout_seconds, help="cancel the query after this many seconds")

    p = add("run", cmd_run, "generate a completion, streamed as it is computed; or many (--batch)")
    p.add_argument("prompt", nargs="?", type=prompt_text, help="the prompt ('' starts from <|endoftext|>)")
    p.add_argument("--batch", metavar="FILE",
                   help="many prompts generated together: one per line, or JSON lines with \"prompt\" and \"seed\" "
                        "('-' reads stdin); prints each completion as a JSON line when it ends")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="with --batch: split the prompts over this many connections (one core each; default 1)")
    p.add_argument("--tokens", type=positive_int, default=10, help="new tokens (default 10)")
    p.add_argument("--temperature", type=temperature, default=1.0, help="softmax temperature (default 1)")
    p.add_argument("--top-n", type=positive_int, default=5, help="sample among the n most likely tokens; 1 = greedy (default 5)")
    p.add_argument("--top-p", type=top_p, default=1.0,
                   help="of the top-n, sample among the fewest whose probability reaches this (nucleus; default 1)")
    p.add_argument("--stop", action="append", type=stop_text, metavar="TEXT",
                   help="end where the completion contains TEXT, leaving TEXT out (repeat for several)")
    p.add_argument("--logprobs", type=non_negative_int, default=0, metavar="K",
                   help="with --json or --batch: each token's K likeliest alternatives and their log-probabilities")
    p.add_argument("--seed", type=seed_int, help="seed of the draws (default: random, shown with --json; with "
                                                "--batch, each prompt's unless its line gives one)")
    p.add_argument("--model", help="model (schema) name; default: the loaded model")
    p.add_argument("--json", action="store_true", help="print one JSON object: prompt_tokens, tokens, text, seed")
    engine_options(p)

    p = add("score", cmd_score, "each token's log-probability given the text before it (the first given "
                                 "<|endoftext|>), and the text's perplexity, computed in SQL")
    p.add_argument("text", type=prompt_text)
    p.add_argument("--model", help="model (schema) name; default: the loaded model")
    p.add_argument("--json", action="store_true", help="print one JSON object: tokens, logprobs, perplexity")
    engine_options(p)

    p = add("embed", cmd_embed, "the text's embedding: its residual stream after the last block and ln_f (or after "
                                 "--layer), averaged over its positions, computed in SQL; printed as a JSON array")
    p.add_argument("text", type=prompt_text)
    p.add_argument("--layer", type=int, help="after this block (0 = the first) instead of after the last and ln_f")
    p.add_argument("--model", help="model (schema) name; default: the loaded model")
    engine_options(p)

    p = add("classify", cmd_classify, "the probability of each choice following the text (the product of its tokens' "
                                       "probabilities, normalised over the choices), computed in SQL")
    p.add_argument("text", type=prompt_text)
    p.add_argument("--choices", nargs="+", required=True, type=choice_text, metavar="CHOICE")
    p.add_argument("--model", help="model (schema) name; default: the loaded model")
    p.add_argument("--json", action="store_true", help="print one JSON object: choice -> probability")
    engine_options(p)

    p = add("fill", cmd_fill, "fill a column from a text column, row by row, with a model function: only the rows "
                               "whose target IS NULL, in batches each computed and written in one transaction, so an "
                               "interrupted run loses at most its batches in flight and the same command finishes it")
    p.add_argument("task", choices=fill.TASKS, metavar="TASK",
                   help="complete, embed, perplexity or classify. complete: the text's completion (text column); "
                        "embed: its embedding (vector or halfvec of "
                        "n_embd dimensions); perplexity (float column); classify: with --choices, the likeliest choice "
                        "(text column) or every choice's probability (jsonb column)")
    p.add_argument("--table", required=True, help="the table, schema-qualified or found on search_path")
    p.add_argument("--text", required=True, metavar="COLUMN", help="the column of texts")
    p.add_argument("--into", required=True, metavar="COLUMN", help="the column to fill (where it IS NULL)")
    p.add_argument("--key", metavar="COLUMN", help="a column with a unique index naming each row (default: the "
                                                   "primary key)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="connections at once, each on its own batches (one core each; default 1)")
    p.add_argument("--batch", type=positive_int, default=8, help="rows per batch and transaction (default 8)")
    p.add_argument("--model", help="model (schema) name; default: the loaded model")
    p.add_argument("--compute-dsn", metavar="DSN",
                   help="compute on this server instead, e.g. standbys (a multi-host DSN); write through --dsn")
    p.add_argument("--tokens", type=positive_int, default=10, help="complete: new tokens (default 10)")
    p.add_argument("--temperature", type=temperature, default=1.0, help="complete: softmax temperature (default 1)")
    p.add_argument("--top-n", type=positive_int, default=5, help="complete: sample among the n most likely tokens; "
                                                                 "1 = greedy (default 5)")
    p.add_argument("--top-p", type=top_p, default=1.0, help="complete: nucleus sampling among the top-n (default 1)")
    p.add_argument("--stop", action="append", type=stop_text, metavar="TEXT",
                   help="complete: end where the completion contains TEXT (repeat for several)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="complete: each row's seed is the first 8 bytes of md5('SEED:KEY') (KEY the row's key as "
                        "text) as a signed 64-bit integer, in SQL ('x' || left(md5(SEED || ':' || key::text), "
                        "16))::bit(64)::bigint, so a rerun gives the same text (default 0)")
    p.add_argument("--layer", type=int, help="embed: after this block (0 = the first) instead of after the last "
                                             "and ln_f")
    p.add_argument("--choices", nargs="+", type=choice_text, metavar="CHOICE", help="classify: the choices")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: filled, skipped (counts by reason), skipped_keys, seconds")

    p = add("next", cmd_next, "the most likely next tokens and their probabilities, computed in SQL")
    p.add_argument("prompt", type=prompt_text)
    p.add_argument("--top", type=positive_int, default=5, help="how many tokens (default 5)")
    p.add_argument("--temperature", type=temperature, nargs="+", default=[1.0], help="one or more temperatures")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    engine_options(p)

    p = add("inspect", cmd_inspect, "look inside: every head's attention weights over the prompt, and the logit "
                                     "lens (the most likely next token after each block), computed in SQL")
    p.add_argument("prompt", type=prompt_text, help="the prompt ('' is <|endoftext|> alone)")
    p.add_argument("--model", help="model (schema) name; default: the loaded model")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: tokens, attention[layer][head][query][key], "
                        "lens[layer][position] = {token, prob}")
    p.add_argument("--png", metavar="FILE", help="draw the attention maps and the lens into a PNG (needs matplotlib: "
                                                "the [png] extra)")
    engine_options(p)

    p = add("tokenize", cmd_tokenize, "token ids of a text, from the SQL tokenizer")
    p.add_argument("text", nargs="?", type=prompt_text)
    p.add_argument("--jsonl", action="store_true", help="read one JSON string per stdin line, print one JSON list each")
    p.add_argument("--model")
    engine_options(p)

    p = add("sql", cmd_sql, "print the query as plain SQL, for any client (in psql: \\i sql/VARIANT.sql)", db=False)
    p.add_argument("variant", nargs="?", default="generate",
                   choices=("generate", "text", "next", "inspect", "score", "perplexity", "embed", "classify",
                            "tokenize"),
                   help="generate: a row per token (default); text: the completion as one value; "
                        "next: next-token candidates; inspect: attention weights and logit lens (SET gpt.task = "
                        "inspect and gpt.tokens = 1 first); score, perplexity: each token's log-probability, the "
                        "text's perplexity (SET gpt.task = score); embed: the text's embedding (SET gpt.task = "
                        "embed); classify: the choices' probabilities after the text (SET gpt.task = classify, "
                        "gpt.prompts = the text, then the choices); tokenize: the prompt's tokens")

    p = add("models", cmd_models, "list loaded models")
    p.add_argument("--json", action="store_true")

    p = add("load", cmd_load, "load a GPT-2 checkpoint dir (OpenAI or Hugging Face format) into PostgreSQL")
    p.add_argument("path")
    p.add_argument("--name", help="schema name (default: from the directory name)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="how the weight matrices are stored: float32 (pgvector vector, default) or float16 "
                        "(halfvec: half the size, faster; activations are rounded to fp16 before each product)")

    p = add("drop", cmd_drop, "remove a loaded model (its schema); refuses what is not a gpt-sql model, and a "
                               "model that objects outside it (a view, a default) depend on")
    p.add_argument("name", help="the model's schema, as `gpt-sql models` lists it")

    p = add("grant", cmd_grant, "let a role run models read-only: USAGE on their schemas and public, SELECT, EXECUTE")
    p.add_argument("role", type=role_name, help="the role (user) to grant")
    p.add_argument("--model", nargs="+", action="extend", metavar="NAME",
                   help="only these models (default: every loaded model); reloads keep the grants")
    p.add_argument("--create", action="store_true", help="create the role first (NOLOGIN unless --login)")
    p.add_argument("--login", action="store_true", help="with --create: a role that can connect")
    p.add_argument("--future", action="store_true",
                   help="also models loaded later under new names, by the role running this: ALTER DEFAULT "
                        "PRIVILEGES, which covers everything that role creates in this database")

    p = add("download", cmd_download, "download OpenAI's GPT-2 checkpoint", db=False)
    p.add_argument("size", help="124M, 355M, 774M or 1558M")
    p.add_argument("--cache", help="directory (default: the user cache dir, or $GPT_SQL_CACHE)")

    p = add("serve", cmd_serve, "serve an OpenAI-compatible API (/v1/completions, /v1/embeddings, /v1/models) and a "
                                 "page that shows the model at work (/), over HTTP")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only). Any other address needs "
                        "--api-key, or --insecure-no-api-key to serve whoever can reach it")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--model", help="serve only this model (schema); default: every loaded model")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("GPT_SQL_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every API request (default: $GPT_SQL_API_KEY, "
                        "which other users cannot read in the process list)")
    p.add_argument("--insecure-no-api-key", action="store_true",
                   help="allow a --host beyond localhost without --api-key: anyone who reaches it can run queries")

    p = add("server", cmd_server, "manage the embedded PostgreSQL server", db=False)
    p.add_argument("action", choices=("status", "start", "stop"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Ctrl-C mid-query: psycopg cancels the query, then warns that the transaction's rollback met the
    # cancellation still in progress ("error ignored in rollback"). The user has our one line; the server
    # aborts the transaction either way.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except USER_ERRORS + (UsageError,) as e:
        print(f"gpt-sql: error: {e}", file=sys.stderr)
        return 1
    except psycopg.Error as e:
        print(f"gpt-sql: database error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpt-sql: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
