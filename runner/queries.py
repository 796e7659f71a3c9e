"""The SQL the runner sends: sql/generate.sql as shipped, or the same pipeline with another final SELECT.

sql/generate.sql is the one source of the pipeline; the variants only replace what follows its `-- decode:`
line, so psql users and the runner run the same CTEs.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

TAIL_MARKER = "-- decode:"

TAILS = {
    "text": """-- complete: each prompt's completion as one text value (a character cut short becomes U+FFFD)
SELECT o.i, decode_utf8(coalesce(string_agg(o.bytes, ''::bytea ORDER BY o.step), ''::bytea)) AS completion
FROM output o
GROUP BY o.i
ORDER BY o.i;
""",
    # every prompt's completion in one text[], in the prompts' order (the batch complete() SQL function)
    "texts": """-- completions: the prompts' completions as one text[], in the prompts' order
SELECT array_agg(c.completion ORDER BY c.i)
FROM (SELECT o.i, decode_utf8(coalesce(string_agg(o.bytes, ''::bytea ORDER BY o.step), ''::bytea)) AS completion
      FROM output o
      GROUP BY o.i) c;
""",
    # the top_n candidates for the first new token, most likely first
    "next": """-- next: the top_n candidates for the next token with their probabilities (softmax of logits / temperature)
SELECT g.token, decode_utf8(t.bytes) AS text, t.bytes, g.prob
FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t
WHERE g.kind = 'candidate' AND g.step = 1
ORDER BY g.prob DESC, g.token;
""",
    # what the model computed for the prompt (gpt.task inspect, gpt.tokens 1): `gpt-sql inspect`
    "inspect": """-- inspect: with gpt.task = inspect (or gpt.inspect = on), what the model saw in the prompt. Rows by kind:
--   'token'     (pos, token)                  the prompt's tokens
--   'attention' (layer, head, pos, weights)   a head's attention weights at query position pos over positions
--                                             0 .. n - 1 (0 where the causal mask hides a key)
--   'lens'      (layer, pos, token, prob)     the logit lens: ln_f and the unembedding (wte) applied to the
--                                             residual stream after block `layer` at position pos, its most
--                                             likely token and that token's probability (softmax, temperature 1)
SELECT 'token' AS kind, NULL::int AS layer, NULL::int AS head, g.pos, g.token, NULL::float8 AS prob,
       NULL::real[] AS weights
FROM generate g, params p
WHERE g.kind = 'token' AND g.step = 0
  AND CASE WHEN p.task <> 'inspect'
           THEN raise_error('SET gpt.inspect = on (or gpt.task = inspect) first: the inspect query reads the values it '
                            'keeps') ELSE 0 END = 0
UNION ALL
SELECT 'attention', g.layer, g.head, w.pos::int - 1, NULL, NULL, w.weights::real[]
FROM generate g, unnest(g.vs) WITH ORDINALITY AS w(weights, pos)
WHERE g.kind = 'attention' AND g.step = 1
UNION ALL
-- per block: ln_f at every position, then the logits as a matrix logits[id][position] from one ordered scan of
-- wte (a product per position for each row while it is at hand; ids are 0 .. n_vocab - 1, so a token's id is its
-- index - 1), then per position the first of the largest logits and its probability, one over the sum of
-- exp(logit - largest)
SELECT 'lens', x.layer - 1, NULL, l.pos - 1, l.token, l.prob, NULL
FROM generate x,
     LATERAL (SELECT ARRAY(SELECT ARRAY(SELECT inner_product(unnest(h.hs), w.w)::real) FROM wte w ORDER BY w.id) AS logits
              FROM (SELECT ARRAY(SELECT as_weights(layer_norm(unnest(x.vs), ln_f.g, ln_f.b))) AS hs FROM ln_f) h
              OFFSET 0) m,
     LATERAL (SELECT c.pos, array_position(c.logits, c.top) - 1 AS token,
                     1 / (SELECT sum(exp0(y::float8 - c.top)) FROM unnest(c.logits) AS y) AS prob
              FROM (SELECT c.pos, c.logits, (SELECT max(y) FROM unnest(c.logits) AS y) AS top
                    FROM (SELECT j AS pos, ARRAY(SELECT unnest(m.logits[:][j:j])) AS logits
                          FROM generate_series(1, cardinality(x.vs)) AS j OFFSET 0) c OFFSET 0) c) l
WHERE x.kind = 'x' AND x.step = 1
ORDER BY kind DESC, layer, head, pos;
""",
    # each text's tokens and their log-probabilities (gpt.task score): the score() SQL function
    "score": """-- score: with gpt.task = score, each text's tokens (pos from 0) and each one's log-probability given the tokens
-- before it (the first given <|endoftext|>)
SELECT g.i, g.pos - 1 AS pos, g.token, decode_utf8(t.bytes) AS text, g.prob AS logprob
FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t, params p
WHERE g.kind = 'score'
  AND CASE WHEN p.task <> 'score' THEN raise_error('SET gpt.task = score first: the score query reads what it keeps')
           ELSE 0 END = 0
ORDER BY g.i, g.pos;
""",
    # each text's perplexity, exp of its tokens' mean negative log-probability (gpt.task score)
    "perplexity": """-- perplexity: with gpt.task = score, each text's perplexity: exp of the mean of its tokens' negative
-- log-probabilities (none for an empty text)
SELECT g.i, exp(-avg(g.prob)) AS perplexity
FROM generate g, params p
WHERE g.kind = 'score'
  AND CASE WHEN p.task <> 'score' THEN raise_error('SET gpt.task = score first: the perplexity query reads what it keeps')
           ELSE 0 END = 0
GROUP BY g.i
ORDER BY g.i;
""",
    # each text's mean residual stream (gpt.task embed): the embed() SQL function
    "embed": """-- embed: with gpt.task = embed, each text's embedding: its residual stream after the last block and ln_f
-- (after block gpt.layer, if set), averaged over its positions
SELECT g.i, g.vs[1] AS embedding
FROM generate g, params p
WHERE g.kind = 'embedding'
  AND CASE WHEN p.task <> 'embed' THEN raise_error('SET gpt.task = embed first: the embed query reads what it keeps')
           ELSE 0 END = 0
ORDER BY g.i;
""",
    # the choices' probabilities after the text (gpt.task classify, prompts: the text, then the choices)
    "classify": """-- classify: with gpt.task = classify (gpt.prompts: the text, then the choices), each choice and its probability
-- after the text: the product of its tokens' probabilities, normalised over the choices (a softmax of their summed
-- log-probabilities)
SELECT c.i - 1 AS choice, p.prompts[c.i] AS text,
       exp0(c.logprob - c.max) / sum(exp0(c.logprob - c.max)) OVER () AS prob
FROM (SELECT c.*, max(c.logprob) OVER () AS max
      FROM (SELECT g.i, sum(g.prob ORDER BY g.pos) AS logprob FROM generate g WHERE g.kind = 'score' GROUP BY g.i) c) c,
     params p
WHERE CASE WHEN p.task <> 'classify'
           THEN raise_error('SET gpt.task = classify first: the classify query reads what it keeps') ELSE 0 END = 0
ORDER BY c.i;
""",
    # the prompt's token ids as one array (the tokenize() SQL function)
    "ids": """-- ids: the prompt's token ids as one array
SELECT coalesce(array_agg(e.token ORDER BY e.pos), '{}') FROM encode e;
""",
    # the prompt's token ids, nothing else is computed
    "tokenize": """-- tokenize: the prompt's token ids and their bytes
SELECT e.pos, e.token, (SELECT t.bytes FROM tokens t WHERE t.id = e.token) AS bytes
FROM encode e
ORDER BY e.pos;
""",
}


@lru_cache(maxsize=None)
def generate_sql() -> str:
    return resources.files("gpt_sql.sql").joinpath("generate.sql").read_text(encoding="utf-8")


def query(kind: str = "generate", base: str | None = None) -> str:
    """`generate` (one row per new token), `text`, `texts`, `next`, `inspect`, `score`, `perplexity`, `embed`,
    `classify`, `tokenize` or `ids`; of `base` (another version of sql/generate.sql, for benchmarks) if given."""
    base = generate_sql() if base is None else base
    if kind == "generate":
        return base
    head, sep, _ = base.rpartition(TAIL_MARKER)
    if not sep:
        raise RuntimeError(f"sql/generate.sql lost its '{TAIL_MARKER}' line")
    return head + TAILS[kind]
