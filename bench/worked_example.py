"""The worked example of docs/how-it-works.md: one prompt through the bundled model, stage by stage, as markdown.

    python bench/worked_example.py [--prompt "ROMEO: But soft"] [--seed 0] [--layer 5 --head 3] [--sql]

Computes with the NumPy reference and tokenizer (runner/reference.py, runner/tokenizer.py, NumpyEngine) on the
bundled shakespeare-mini checkpoint: the pre-tokenizer's classes and pieces, the BPE merges of one piece in the
order they apply (with their ranks), the token ids, one head's attention weights over the prompt, the first new
token's top_n candidates with their probabilities, the draw u = md5('<seed>:1') with the candidate it picks, and
the prompt's scores and a classification of it.

With --sql it also runs the same stages in SQL, on the server gpt-sql would use (set GPT_SQL_DATA for an embedded
server of your own; the model must be loaded, e.g. `gpt-sql load <bundled path> --name shakespeare_mini`), and
prints how far the two are apart: the tokenizer CTEs' own rows (pretokenize, bpe), the inspect variant's
attention weights, the next variant's candidates, the generate query's first token, score and classify, and
the chunk length the chunking CTE picks.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np
import regex

from gpt_sql.loader.checkpoint import read_checkpoint
from gpt_sql.runner import reference
from gpt_sql.runner.engine import NumpyEngine
from gpt_sql.runner.firstrun import BUNDLED, bundled_path
from gpt_sql.runner.tokenizer import pretokenize


def char_class(c: str) -> str:
    """The class the chars CTE gives a character (char_classes is computed at load with the same `regex` tests)."""
    if regex.match(r"\p{L}", c):
        return "L"
    if regex.match(r"\p{N}", c):
        return "N"
    if regex.match(r"\s", c):
        return "S"
    return "O"


def shown(s: str) -> str:
    """A piece inside a markdown table cell: code, with a space made visible."""
    return "`" + s.replace(" ", "␠").replace("|", "\\|").replace("\n", "\\n") + "`"


def bpe_steps(engine: NumpyEngine, piece: str) -> tuple[list[str], list[tuple[str, str, int, list[str]]]]:
    """The piece's symbols before any merge, and each merge as the reference applies it: (left, right, rank,
    symbols after). The reference's bpe() returns only the end; this replays its rule (lowest rank, leftmost)."""
    tok = engine.tokenizer
    parts = [tok.byte_encoder[b] for b in piece.encode("utf-8")]
    start, steps = list(parts), []
    while len(parts) > 1:
        ranked = [(tok.ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in tok.ranks]
        if not ranked:
            break
        rank, i = min(ranked)
        left, right = parts[i], parts[i + 1]
        parts[i:i + 2] = [left + right]
        steps.append((left, right, rank, list(parts)))
    assert parts == tok.bpe("".join(start)), "the replay must end where the reference's bpe() does"
    return start, steps


def md5_draw(seed: int, step: int) -> tuple[str, float]:
    digest = hashlib.md5(f"{seed}:{step}".encode()).hexdigest()
    return digest, reference.uniform(seed, step)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, rule, *rows])


def numpy_example(a: argparse.Namespace) -> tuple[str, dict]:
    ckpt = read_checkpoint(bundled_path())
    engine = NumpyEngine(ckpt)
    tok, hp = engine.tokenizer, ckpt.hparams
    out: list[str] = []
    facts: dict = {}

    out.append(f"Model: the bundled `{BUNDLED}` ({ckpt.n_params:,} parameters; n_layer {hp['n_layer']}, n_head "
               f"{hp['n_head']}, n_embd {hp['n_embd']}, n_ctx {hp['n_ctx']}, n_vocab {hp['n_vocab']}), computed in "
               f"fp32. Prompt: `{a.prompt}`. Seed {a.seed}, temperature {a.temperature:g}, top_n {a.top_n}.")

    # chars and pretokenize: a character starts a piece where the regex's match starts
    pieces = pretokenize(a.prompt)
    starts, at = set(), 0
    for p in pieces:
        starts.add(at)
        at += len(p)
    chars = list(a.prompt)
    facts["pretokenize"] = [(c, char_class(c), int(k in starts)) for k, c in enumerate(chars)]
    out.append("\n### chars and pretokenize\n")
    out.append(table(["character", *[shown(c) for c in chars]],
                     [["class (cls)", *[char_class(c) for c in chars]],
                      ["starts a piece", *[str(int(k in starts)) for k in range(len(chars))]]]))
    out.append("\nPieces: " + ", ".join(shown(p) for p in pieces))
    facts["pieces"] = pieces

    # bpe of one piece: by default the one with the most merges (the first of those)
    counts = [len(bpe_steps(engine, p)[1]) for p in pieces]
    k = a.piece if a.piece is not None else max(range(len(pieces)), key=lambda j: (counts[j], -j))
    if not 0 <= k < len(pieces):
        raise SystemExit(f"worked_example: --piece must be between 0 and {len(pieces) - 1}")
    start, steps = bpe_steps(engine, pieces[k])
    facts["bpe"] = (k, pieces[k], [tok.encoder[s] for s in start],
                    [(tok.encoder[l], tok.encoder[r], rank, [tok.encoder[s] for s in after])
                     for l, r, rank, after in steps])
    out.append(f"\n### bpe of the piece {shown(pieces[k])}\n")
    out.append(f"Its UTF-8 bytes as byte tokens (GPT-2's byte-to-unicode alphabet, `Ġ` is the space): "
               + " ".join(f"{shown(s)} ({tok.encoder[s]})" for s in start) + ". The ranks of its adjacent pairs "
               "before the first merge (bpe's `ranks`): "
               + (", ".join(f"{shown(l + r)} {tok.ranks.get((l, r), 'none')}" for l, r in zip(start, start[1:]))
                  or "no pairs") + ".\n")
    if not steps:
        out.append("No adjacent pair of it has a rank: no merge applies.")
    else:
        out.append(table(["merge", "pair", "rank", "new token", "symbols after"],
                         [[str(n), f"{shown(l)} + {shown(r)}", str(rank), str(tok.encoder[l + r]),
                           " ".join(shown(s) for s in after)] for n, (l, r, rank, after) in enumerate(steps, 1)],
                         "rlrrl"))

    # encode
    ids = engine.encode(a.prompt)
    facts["ids"] = ids
    out.append("\n### encode\n")
    out.append(table(["pos", "token id", "piece", "text"],
                     [[str(p), str(t), shown(tok.decoder[t]), shown(tok.token_bytes(t).decode("utf-8", "replace"))]
                      for p, t in enumerate(ids)], "rrll"))

    # attention of one head, from the reference's inspect (the weights softmax gives, per query position)
    if not (0 <= a.layer < hp["n_layer"] and 0 <= a.head < hp["n_head"]):
        raise SystemExit(f"worked_example: --layer must be below {hp['n_layer']} and --head below {hp['n_head']}")
    inspected = engine.model.inspect(ids)
    w = inspected["attention"][a.layer, a.head]
    facts["attention"] = w
    labels = [shown(tok.token_bytes(t).decode("utf-8", "replace")) for t in ids]
    out.append(f"\n### attention, layer {a.layer} head {a.head} (from 0)\n")
    out.append("Each row is a query position, each column a key position; the causal mask leaves the upper "
               "triangle at 0; each row sums to 1.\n")
    out.append(table(["query \\ key", *labels],
                     [[labels[q], *[f"{w[q, j]:.3f}" if j <= q else "" for j in range(len(ids))]]
                      for q in range(len(ids))], "l" + "r" * len(ids)))

    # the first new token: logits of the last position, top_n, softmax, the draw
    logits = engine.model.logits(ids, engine.model.new_cache())[-1]
    scaled = logits.astype(np.float64) / a.temperature
    probs = reference.softmax(scaled)
    order = reference.top(scaled, a.top_n)
    e = np.exp(scaled[order] - scaled[order[0]])
    cumulative = np.cumsum(e) / e.sum()
    digest, u = md5_draw(a.seed, 1)
    token, prob = reference.sample(logits, a.temperature, a.top_n, u)
    facts["candidates"] = [(int(t), float(probs[t])) for t in order]
    facts["sampled"] = token
    out.append("\n### top, probs and sample: the first new token\n")
    out.append(f"The top {a.top_n} of {hp['n_vocab']} logits (x @ wte.T / temperature at the last position); "
               f"`p` is softmax over the whole vocabulary (what the row reports), `share` the candidate's part "
               f"of the top {a.top_n}, `cumulative` what sample compares with u.\n")
    out.append(table(["rank", "token id", "text", "logit", "p", "share", "cumulative"],
                     [[str(r), str(int(t)), shown(tok.token_bytes(int(t)).decode("utf-8", "replace")),
                       f"{scaled[t]:.3f}", f"{probs[t]:.4f}", f"{e[r - 1] / e.sum():.4f}", f"{cumulative[r - 1]:.4f}"]
                      for r, t in enumerate(order, 1)], "rrlrrrr"))
    picked = int(np.searchsorted(cumulative, u, side="right")) + 1
    out.append(f"\nThe draw: md5('{a.seed}:1') = `{digest}`; its first 13 hex digits `{digest[:13]}` are 52 bits, "
               f"u = 0x{digest[:13]} / 2^52 = {u:.4f}. The first candidate whose cumulative share exceeds u is rank "
               f"{picked}: token {token} {shown(tok.token_bytes(token).decode('utf-8', 'replace'))} "
               f"(p = {prob:.4f}).")

    # score and classify: the same model read as log-probabilities of given tokens
    scores = engine.score(a.prompt)
    facts["score"] = scores
    out.append("\n### score\n")
    out.append("Each token's log-probability given the tokens before it, the first given `<|endoftext|>`:\n")
    out.append(table(["pos", "token id", "text", "logprob"],
                     [[str(p), str(t), shown(tok.token_bytes(t).decode("utf-8", "replace")), f"{lp:.4f}"]
                      for p, (t, lp) in enumerate(scores)], "rrlr"))
    perplexity = float(np.exp(-np.mean([lp for _, lp in scores])))
    facts["perplexity"] = perplexity
    out.append(f"\nPerplexity: exp(-mean logprob) = {perplexity:.2f}.")
    classified = engine.classify(a.prompt, a.choices)
    facts["classify"] = classified
    out.append("\n### classify\n")
    out.append("Each choice's probability after the text, normalised over the choices:\n")
    out.append(table(["choice", "token ids", "prob"],
                     [[shown(c), str(tok.encode(c)), f"{p:.4f}"] for c, p in classified], "llr"))
    chosen = [tok.encode(c) for c in a.choices]
    if all(len(c) == 1 for c in chosen):
        # one token each: classify is then the next-token softmax after <|endoftext|> + text, renormalised
        plain = reference.softmax(logits.astype(np.float64))  # temperature 1, as classify
        after = reference.softmax(engine.model.logits([engine.eot] + ids, engine.model.new_cache())[-1]
                                  .astype(np.float64))
        out.append("\nEach choice is one token here, so these are the next-token probabilities after "
                   "`<|endoftext|>` + the text (" + ", ".join(f"{shown(c)} {after[t[0]]:.4f}"
                                                             for c, t in zip(a.choices, chosen))
                   + ") over their sum. Without `<|endoftext|>` in front (as generate runs) they are "
                   + ", ".join(f"{shown(c)} {plain[t[0]]:.4f}" for c, t in zip(a.choices, chosen)) + ".")
    return "\n".join(out), facts


def sql_check(a: argparse.Namespace, facts: dict) -> str:
    """The same stages from the query on a server: the tokenizer CTEs' rows, inspect, next, generate, score,
    classify and chunking."""
    from gpt_sql.runner import engine as sql_engine
    from gpt_sql.runner import queries
    from gpt_sql.runner.db import connect
    from gpt_sql.runner.models import resolve_model

    conn = connect(a.dsn)
    model = resolve_model(conn, a.model)
    head = queries.generate_sql().rpartition(queries.TAIL_MARKER)[0]

    def cte_rows(tail: str) -> list[tuple]:
        with conn.transaction():
            sql_engine.prepare(conn, model, {"gpt.prompt": a.prompt}, None)
            return conn.execute(head + tail).fetchall()

    lines = [f"\n### the same from SQL (model `{model}`)\n"]
    pre = cte_rows("SELECT p.c, c.cls, p.starts FROM pretokenize p JOIN chars c ON c.i = p.i AND c.ch = p.ch "
                   "ORDER BY p.ch")
    lines.append(f"- pretokenize's rows (character, class, starts): "
                 f"{'equal' if [tuple(r) for r in pre] == facts['pretokenize'] else 'DIFFERENT: ' + repr(pre)}")
    index, piece, start, steps = facts["bpe"]
    # bpe's rows for the piece, one per merge step: each not-done row's lowest rank is the merge it leads to
    rows = cte_rows(f"SELECT symbols, (SELECT min(r) FROM unnest(ranks) r) FROM bpe "
                    f"WHERE piece = (SELECT piece FROM pieces WHERE i = 1 AND piece_no = {index + 1}) AND NOT done "
                    f"ORDER BY cardinality(symbols) DESC")
    sql_steps = [(list(s), r) for s, r in rows]
    ref_steps = [(start, steps[0][2] if steps else None)] + [(after, nxt[2]) for (_, _, _, after), nxt in
                                                              zip(steps, steps[1:] + [(None, None, None, None)])]
    lines.append(f"- bpe's rows for {shown(piece)} (symbols, the rank merged next): "
                 f"{'equal' if sql_steps == ref_steps else 'DIFFERENT: ' + repr(sql_steps)}")
    ids = [t for t, _ in sql_engine.tokenize_sql(conn, model, a.prompt)]
    lines.append(f"- token ids: {ids} ({'equal' if ids == facts['ids'] else 'DIFFERENT'})")
    inspected = sql_engine.inspect_sql(conn, model, a.prompt)
    diff = float(np.abs(inspected["attention"][a.layer, a.head] - facts["attention"]).max())
    lines.append(f"- attention weights of layer {a.layer} head {a.head}: largest difference {diff:.1e}")
    nxt = sql_engine.next_sql(conn, model, a.prompt, a.top_n, a.temperature)
    same = [t.token for t in nxt] == [t for t, _ in facts["candidates"]]
    pdiff = max(abs(t.prob - p) for t, (_, p) in zip(nxt, facts["candidates"]))
    lines.append(f"- candidates: {'the same tokens' if same else 'DIFFERENT tokens'}, probabilities at most "
                 f"{pdiff:.1e} apart")
    first = next(sql_engine.generate_sql(conn, model, sql_engine.Params(a.prompt, tokens=1, temperature=a.temperature,
                                                                        top_n=a.top_n, seed=a.seed)))
    lines.append(f"- the generate query's first token with seed {a.seed}: {first.token} "
                 f"({'equal' if first.token == facts['sampled'] else 'DIFFERENT'})")
    scored = sql_engine.score_sql(conn, model, a.prompt)
    sdiff = max(abs(lp - r) for (_, lp), (_, r) in zip(scored, facts["score"]))
    same = [t for t, _ in scored] == [t for t, _ in facts["score"]]
    lines.append(f"- score: {'the same tokens' if same else 'DIFFERENT tokens'}, log-probabilities at most "
                 f"{sdiff:.1e} apart")
    classified = sql_engine.classify_sql(conn, model, a.prompt, a.choices)
    cdiff = max(abs(p - r) for (_, p), (_, r) in zip(classified, facts["classify"]))
    lines.append(f"- classify: probabilities at most {cdiff:.1e} apart")
    (chunk_steps, work_mem), = cte_rows("SELECT chunk_steps, current_setting('work_mem') FROM chunking")
    lines.append(f"- chunking: {chunk_steps} steps a chunk (ceil(sqrt(n_ctx)), at most what work_mem = {work_mem} "
                 f"holds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Prints markdown on stdout; docs/how-it-works.md quotes its output.")
    ap.add_argument("--prompt", default="ROMEO: But soft", help="the prompt (default %(default)r)")
    ap.add_argument("--seed", type=int, default=0, help="the draw of step 1 is md5('<seed>:1') (default 0)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-n", type=int, default=5, help="candidates to sample from (default 5, as the query's)")
    ap.add_argument("--layer", type=int, default=5, help="the attention head's layer, from 0 (default 5)")
    ap.add_argument("--head", type=int, default=3, help="the attention head, from 0 (default 3)")
    ap.add_argument("--piece", type=int, help="which pre-tokenizer piece's merges to show, from 0 (default: the "
                                              "piece with the most merges)")
    ap.add_argument("--choices", nargs="+", default=["ly", ","], help="classify's choices after the prompt "
                                                                     "(default: 'ly' ',')")
    ap.add_argument("--sql", action="store_true", help="also compute the stages in SQL and compare")
    ap.add_argument("--model", default=BUNDLED, help=f"with --sql: the loaded model's name (default {BUNDLED})")
    ap.add_argument("--dsn", help="with --sql: the server (default: as gpt-sql chooses, e.g. the embedded one)")
    a = ap.parse_args(argv)
    if not a.prompt:
        ap.error("--prompt must not be empty")
    text, facts = numpy_example(a)
    print(text)
    if a.sql:
        print(sql_check(a, facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
