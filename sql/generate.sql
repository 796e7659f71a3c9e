-- gpt-sql: GPT-2 text generation as one recursive SQL query (PostgreSQL >= 15, pgvector >= 0.7).
--
-- The model is the one on search_path (SET search_path = gpt2_124m, public). Parameters are settings:
--   SET gpt.prompt = 'Happy New Year!';  -- '' starts unconditionally from <|endoftext|>
--   SET gpt.tokens = 10;                 -- new tokens (stops early at <|endoftext|>)
--   SET gpt.temperature = 1;             -- > 0
--   SET gpt.top_n = 5;                   -- sample among the n most likely tokens; 1 = greedy
--   SET gpt.seed = 0;                    -- step k draws u = first 52 bits of md5('<seed>:<k>') / 2^52
--   SET gpt.inspect = off;               -- on: also keep every head's attention weights and the residual
--                                        -- stream after each block (`gpt-sql sql inspect` reads them)
-- One row per generated token, in order, as it is produced: step, token, its text, its bytes, its probability
-- (softmax of logits / temperature over the whole vocabulary).
-- Each CTE is named after its twin in runner/reference.py.
WITH RECURSIVE
-- settings: the parameters as text, from the gpt.* settings. A model's SQL functions (generate, complete,
-- next_tokens, tokenize; loader/functions.py) are this same query with their arguments in this CTE's place
settings(prompt, tokens, temperature, top_n, seed, inspect) AS (
    SELECT current_setting('gpt.prompt', true), current_setting('gpt.tokens', true),
           current_setting('gpt.temperature', true), current_setting('gpt.top_n', true),
           current_setting('gpt.seed', true), current_setting('gpt.inspect', true)
),
-- params: the settings, with defaults, checked before any work; and the dimensions derived from the model: hd,
-- and c_proj_width, how many of mlp_c_proj's inputs a row of it holds (the loader makes rows as wide as fit a page)
params AS (
    SELECT h.*, h.n_embd / h.n_head AS hd, (SELECT vector_dims(r.w) FROM mlp_c_proj r LIMIT 1) AS c_proj_width, s.*
    FROM hparams h, settings,
         LATERAL (SELECT coalesce(settings.prompt, 'Happy New Year!') AS prompt,
                         coalesce(nullif(settings.tokens, '')::int, 10) AS n_tokens,
                         coalesce(nullif(settings.temperature, '')::float8, 1) AS temperature,
                         coalesce(nullif(settings.top_n, '')::int, 5) AS top_n,
                         coalesce(nullif(settings.seed, '')::bigint, 0) AS seed,
                         coalesce(nullif(settings.inspect, '')::bool, false) AS inspect) s
    WHERE CASE
        WHEN s.n_tokens < 1 THEN raise_error(format('gpt.tokens must be at least 1, got %s', s.n_tokens))
        WHEN NOT s.temperature > 0 OR s.temperature IN ('Infinity', 'NaN')
            THEN raise_error(format('gpt.temperature must be a positive number, got %s', s.temperature))
        WHEN s.top_n NOT BETWEEN 1 AND h.n_vocab
            THEN raise_error(format('gpt.top_n must be between 1 and %s (the vocabulary), got %s', h.n_vocab, s.top_n))
        ELSE 0 END = 0
),
-- chars: the prompt's characters with their class in GPT-2's pattern: L letter, N number, S space, O other
chars AS (
    SELECT t.i, t.c,
           (SELECT cc.class FROM char_classes cc WHERE cc.lo <= ascii(t.c) ORDER BY cc.lo DESC LIMIT 1) AS cls
    FROM params, string_to_table(params.prompt, NULL) WITH ORDINALITY AS t(c, i)
),
-- contractions: 's 't 're 've 'm 'll 'd where an apostrophe can start a piece (not inside " '..." or "!'...")
contractions AS (
    SELECT i, c, cls, lag(c) OVER w AS prev_c, lag(cls) OVER w AS prev_cls, lead(cls) OVER w AS next_cls,
           CASE WHEN c = '''' AND (lag(cls) OVER w IS NULL OR lag(cls) OVER w IN ('L', 'N')
                                   OR (lag(cls) OVER w = 'S' AND lag(c) OVER w <> ' '))
                THEN CASE WHEN lead(c) OVER w IN ('s', 't', 'm', 'd') THEN 2
                          WHEN lead(c) OVER w || lead(c, 2) OVER w IN ('re', 've', 'll') THEN 3
                          ELSE 0 END
                ELSE 0 END AS contraction
    FROM chars WINDOW w AS (ORDER BY i)
),
-- pretokenize: where GPT-2's regex starts a new piece, decided from each character's neighbours
pretokenize AS (
    SELECT i, c, CASE
        WHEN prev_cls IS NULL THEN 1
        WHEN lag(contraction) OVER w >= 2 OR lag(contraction, 2) OVER w = 3 THEN 0   -- inside a contraction
        WHEN lag(contraction, 2) OVER w = 2 OR lag(contraction, 3) OVER w = 3 THEN 1 -- just after one
        WHEN contraction > 0 THEN 1
        -- \s+(?!\S) leaves the last space of a run to the next piece; \s+ takes a run at the end
        WHEN cls = 'S' THEN (prev_cls <> 'S' OR coalesce(next_cls <> 'S', false))::int
        WHEN prev_c = ' ' THEN 0                                                       -- " ?\p{L}+" etc.
        ELSE (prev_cls <> cls)::int
    END AS starts
    FROM contractions WINDOW w AS (ORDER BY i)
),
pieces AS (
    SELECT piece_no, string_agg(c, '' ORDER BY i) AS piece
    FROM (SELECT i, c, sum(starts) OVER (ORDER BY i) AS piece_no FROM pretokenize) p GROUP BY piece_no
),
-- bpe: each distinct piece as byte tokens, then one merge per step: the lowest-ranked adjacent pair (leftmost on
-- ties). The ranks of the adjacent pairs are kept beside the symbols (ranks[k] is that of symbols k, k+1), so a
-- step looks up only the two pairs its merge creates
bpe AS (
    SELECT w.piece, s.symbols,
           ARRAY(SELECT (SELECT mg.rank FROM merges mg WHERE mg.a = s.symbols[k] AND mg.b = s.symbols[k + 1])
                 FROM generate_series(1, cardinality(s.symbols) - 1) AS k ORDER BY k) AS ranks,
           false AS done
    FROM (SELECT DISTINCT piece, convert_to(piece, 'UTF8') AS utf8 FROM pieces) w,
         LATERAL (SELECT ARRAY(SELECT bt.token
                               FROM generate_series(0, length(w.utf8) - 1) AS k
                               JOIN byte_tokens bt ON bt.byte = get_byte(w.utf8, k) ORDER BY k) AS symbols) s
    UNION ALL
    SELECT bpe.piece, coalesce(m.symbols, bpe.symbols), coalesce(m.ranks, bpe.ranks), m.symbols IS NULL
    FROM bpe LEFT JOIN LATERAL (
        SELECT bpe.symbols[:best.k - 1] || best.merged || bpe.symbols[best.k + 2:] AS symbols,
               bpe.ranks[:best.k - 2]
               || CASE WHEN best.k > 1 THEN ARRAY[(SELECT mg.rank FROM merges mg
                                                   WHERE mg.a = bpe.symbols[best.k - 1] AND mg.b = best.merged)]
                       ELSE '{}'::int[] END
               || CASE WHEN best.k + 2 <= cardinality(bpe.symbols)
                       THEN ARRAY[(SELECT mg.rank FROM merges mg
                                   WHERE mg.a = best.merged AND mg.b = bpe.symbols[best.k + 2])]
                       ELSE '{}'::int[] END
               || bpe.ranks[best.k + 2:] AS ranks
        FROM (SELECT r.k::int AS k,
                     (SELECT mg.merged FROM merges mg
                      WHERE mg.a = bpe.symbols[r.k] AND mg.b = bpe.symbols[r.k + 1]) AS merged
              FROM unnest(bpe.ranks) WITH ORDINALITY AS r(rank, k)
              WHERE r.rank IS NOT NULL ORDER BY r.rank, r.k LIMIT 1) best
    ) m ON true
    WHERE NOT bpe.done
),
-- encode: the prompt's token ids by position
encode AS (
    SELECT row_number() OVER (ORDER BY p.piece_no, t.ord)::int - 1 AS pos, t.token
    FROM pieces p JOIN bpe ON bpe.piece = p.piece AND bpe.done,
         unnest(bpe.symbols) WITH ORDINALITY AS t(token, ord)
),
-- prompt: the encoded prompt (an empty one is <|endoftext|> alone), if it and the new tokens fit in n_ctx
prompt AS (
    SELECT e.pos, e.token
    FROM (SELECT pos, token FROM encode
          UNION ALL
          SELECT 0, eot FROM params WHERE NOT EXISTS (SELECT FROM encode)) e,
         params, (SELECT greatest(count(*), 1) AS n FROM encode) len
    WHERE CASE WHEN len.n + params.n_tokens > params.n_ctx
               THEN raise_error(format('the prompt is %s tokens and %s new tokens were asked for: '
                                       'together at most n_ctx = %s fit', len.n, params.n_tokens, params.n_ctx))
               ELSE 0 END = 0
),
-- chunking: how many steps a chunk of generate runs (see there). A chunk's steps read the cache it starts from in
-- place and copy only the keys and values added since (its tail); its end adds them to the cache, a copy of the
-- whole cache. A chunk of L steps copies tails of about L^2/2 positions and the cache once: L = ceil(sqrt(positions))
-- keeps both small. At most what work_mem holds of the tails the chunk keeps (L^2/2 positions, each keys and
-- values: 2 x n_layer x n_embd float4s) until it ends
chunking AS (
    SELECT greatest(1, least(ceil(sqrt(len.n + p.n_tokens)),
                             floor(sqrt(pg_size_bytes(current_setting('work_mem')) / (2 * p.n_layer * p.n_embd * 4)))
                             ))::int AS chunk_steps
    FROM params p, (SELECT count(*) AS n FROM prompt) len
),
-- generate: each step runs the new positions through the blocks and samples one token. Row kinds:
--   'token'     (step, pos, token, prob) a prompt token (step 0) or a sampled one
--   'candidate' (step, token, prob)      the top_n tokens the step sampled from
--   'cache'     (step, pos, inputs, cache) where a chunk starts: the next step's input tokens (the prompt at step 0,
--                                        then the token just sampled) from position pos on, and the KV cache of the
--                                        positions before: per layer and head in order, its keys and values
--   'state'     (step, pos, inputs, cache) the same within a chunk, its cache only the positions since the chunk's
--                                        start (the tail; kept inside the chunk)
--   'attention' (step, layer, head, vs)  with gpt.inspect on: the head's attention weights, a vector per new position
--   'x'         (step, layer, vs)        with gpt.inspect on: the residual stream after block layer - 1
-- The steps run in chunks of chunk_steps (see chunking), a recursion within this one: the outer recursion goes from
-- cache to cache, the inner one (chunk) from step to step. A step reads the chunk's cache in place, as a parameter
-- (a LATERAL subquery over the 'cache' row), and carries on only the tail: the working table is a recursion's
-- only state, and a CTE keeps every row its recursion emits until the query ends, so a whole cache carried by
-- every step would be copied several times a step and kept once per step. The chunk's last step adds the tail to
-- the cache, once. Within a step, the new positions travel together: activations are one vector[] (a vector per
-- position), so each weight row is read once per layer and multiplied with every new position while it is at hand.
generate AS (
    SELECT 'token' AS kind, 0 AS step, NULL::int AS layer, NULL::int AS head, pos, token, NULL::float8 AS prob,
           NULL::vector[] AS vs, NULL::int[] AS inputs, NULL::head_cache[] AS cache
    FROM prompt
    UNION ALL
    SELECT 'cache', 0, NULL, NULL, 0, NULL, NULL, NULL, array_agg(token ORDER BY pos), NULL FROM prompt
    UNION ALL
    SELECT chunk.* FROM (SELECT g.* FROM generate g WHERE g.kind = 'cache' OFFSET 0) base, LATERAL (WITH RECURSIVE
    -- chunk: the steps from a 'cache' row (base): the first from base with an empty tail, each next from the 'state'
    -- its step before ended with (a chunk's last step ends with a 'cache' instead, and the last step with neither)
    chunk AS (
        SELECT 'state' AS kind, base.step, NULL::int AS layer, NULL::int AS head, base.pos, NULL::int AS token,
               NULL::float8 AS prob, NULL::vector[] AS vs, base.inputs, NULL::head_cache[] AS cache
        UNION ALL
        SELECT step.*
        FROM (SELECT s.* FROM chunk s WHERE s.kind = 'state' OFFSET 0) state, LATERAL (WITH RECURSIVE
        -- inputs: the positions this step runs, and their tokens
        inputs AS (
            SELECT state.pos + u.i::int - 1 AS pos, u.token FROM unnest(state.inputs) WITH ORDINALITY AS u(token, i)
        ),
        -- this_step: the number of this step and the position of the token it samples
        this_step AS (SELECT state.step + 1 AS step, state.pos + cardinality(state.inputs) AS pos),
        -- embed: token + position embeddings of the new positions, in order (in fp32 whatever the weights' type);
        -- n_past positions come before them (base.pos in the chunk's cache, the rest in the tail)
        embed AS (
            SELECT state.pos AS n_past, array_agg(wte.w::vector + wpe.w::vector ORDER BY i.pos) AS xs
            FROM inputs i JOIN wte ON wte.id = i.token JOIN wpe ON wpe.pos = i.pos
        ),
        -- transformer_block, once per layer: x + mha(layer_norm(x)), then x + ffn(layer_norm(x))
        blocks AS (
            SELECT 'x' AS kind, 0 AS layer, NULL::int AS head, xs AS vs, NULL::head_cache AS kv FROM embed
            UNION ALL
            (WITH
            x AS (SELECT b.layer, b.vs AS xs FROM blocks b, params WHERE b.kind = 'x' AND b.layer < params.n_layer),
            ln_1_out AS MATERIALIZED (
                SELECT x.layer, ARRAY(SELECT as_weights(layer_norm(u.x, ln.g, ln.b))
                                      FROM unnest(x.xs) WITH ORDINALITY u(x, p) ORDER BY u.p) AS hs
                FROM x JOIN ln_1 ln ON ln.layer = x.layer
            ),
            -- linear(ln_1_out, c_attn) -> q | k | v, one vector per new position. Every linear has this form: one
            -- ordered scan of the layer's weight rows (one output column each) and, per row, its products with all
            -- new positions while the row is at hand. With several positions the products make a matrix
            -- y[col][pos] (2-D real[]), cut into the positions' vectors by columns_of; unnest in the select list
            -- streams the positions in array order (in FROM it would copy every position's vector for every row).
            -- A single position (every decode step) skips the matrix: its vector is the column-ordered array
            -- itself, and the position's vector is taken out of its array once (one: OFFSET 0 keeps it a value),
            -- not at every weight row (0.05 us a row). The inputs are as_weights(...): in the weights' type, vector
            -- or halfvec (see schema.sql).
            c_attn AS MATERIALIZED (
                SELECT h.layer, CASE WHEN cardinality(h.hs) = 1
                       THEN ARRAY[ARRAY(SELECT inner_product(one.h, w.w) + w.b
                                        FROM attn_c_attn w WHERE w.layer = h.layer ORDER BY w.col)::vector]
                       ELSE columns_of(ARRAY(SELECT ARRAY(SELECT (inner_product(unnest(h.hs), w.w) + w.b)::real)
                                             FROM attn_c_attn w WHERE w.layer = h.layer ORDER BY w.col)) END AS ys
                FROM ln_1_out h, LATERAL (SELECT h.hs[1] AS h OFFSET 0) one
            ),
            -- split_heads: q and k of each head as one hd-vector per new position; v as one vector over the new
            -- positions per column (the cache keeps values transposed). lh: the head's place in the cache
            qkv AS MATERIALIZED (
                SELECT c.layer, head, c.layer * p.n_head + head + 1 AS lh,
                       ARRAY(SELECT subvector(unnest(c.ys), head * p.hd + 1, p.hd)) AS q,
                       ARRAY(SELECT subvector(unnest(c.ys), p.n_embd + head * p.hd + 1, p.hd)) AS k,
                       CASE WHEN cardinality(c.ys) = 1
                            THEN ARRAY(SELECT subvector(c.ys[1], 2 * p.n_embd + head * p.hd + j, 1)
                                       FROM generate_series(1, p.hd) AS j ORDER BY j)
                            ELSE columns_of(ARRAY(SELECT subvector(unnest(c.ys), 2 * p.n_embd + head * p.hd + 1, p.hd)::real[]))
                       END AS v
                FROM c_attn c, params p, generate_series(0, p.n_head - 1) AS head
            ),
            -- recent: each head's keys and values since the chunk's cache: the state's tail, then the new positions'
            recent AS MATERIALIZED (
                SELECT n.layer, n.head, n.lh, n.q, coalesce((t.c).k, '{}') || n.k AS k,
                       CASE WHEN t.c IS NULL THEN n.v ELSE ARRAY(SELECT unnest((t.c).v) || unnest(n.v)) END AS v
                FROM qkv n, LATERAL (SELECT state.cache[n.lh] AS c OFFSET 0) t
            ),
            -- attention: softmax(q k^T / sqrt(hd) + causal mask) @ v, one row per head and new position, with the
            -- head's part of the chunk's cache found once (past: a walk along base's cache, its element used in
            -- place). From the inside out: the position's scores against the head's cached keys and its recent ones
            -- up to itself (the causal mask is the LIMIT), their max, softmax's numerators exp(s - max) over the
            -- cached positions (eo, NULL in the first chunk) and over the recent ones (en, zeros past the mask) and
            -- their sum, then o: per value column, the numerators' products with its cached values and its recent
            -- ones, over the sum. OFFSET 0 computes each stage once: a flattened one would be evaluated again at
            -- every use, e.g. per column
            attention AS MATERIALIZED (
                SELECT a.head, a.p, a.eo, a.en, a.total,
                       ARRAY(SELECT ((coalesce(y.old, 0) + y.new) / a.total)::real
                             FROM (SELECT inner_product(a.eo, unnest((a.past).v)) AS old,
                                          inner_product(a.en, unnest(a.v)) AS new) y) AS o
                FROM (SELECT n.head, n.v, past.c AS past, e.p, CASE WHEN base.pos > 0 THEN e.e[:base.pos]::vector END AS eo,
                             (e.e[base.pos + 1:] || array_fill(0::float8, ARRAY[cardinality(n.k) + base.pos - cardinality(e.e)]))::vector AS en,
                             (SELECT sum(y) FROM unnest(e.e) AS y) AS total
                      FROM recent n, embed m, params pr, LATERAL (SELECT base.cache[n.lh] AS c OFFSET 0) past, LATERAL (
                          SELECT s.p, ARRAY(SELECT exp(unnest(s.s) - s.max)) AS e
                          FROM (SELECT s.p, s.s, (SELECT max(y) FROM unnest(s.s) AS y) AS max
                                FROM (SELECT q.p, ARRAY(SELECT inner_product(q.q, k.k) / sqrt(pr.hd)
                                                        FROM (SELECT unnest((past.c).k) AS k UNION ALL SELECT unnest(n.k)) k
                                                        LIMIT m.n_past + q.p) AS s
                                      FROM unnest(n.q) WITH ORDINALITY AS q(q, p) OFFSET 0) s OFFSET 0) s OFFSET 0) e
                      OFFSET 0) a
            ),
            -- heads: each head's outputs at its new positions, o[position][column]
            heads AS MATERIALIZED (SELECT head, array_agg(o ORDER BY p) AS o FROM attention GROUP BY head),
            -- merge_heads: per new position, the heads' outputs side by side
            merge_heads AS MATERIALIZED (
                SELECT ARRAY(SELECT as_weights(ARRAY(SELECT unnest(h.o[p:p][:]) FROM heads h ORDER BY h.head)::vector)
                             FROM generate_series(1, cardinality(x.xs)) AS p ORDER BY p) AS a
                FROM x
            ),
            -- mha: the heads' output through c_proj, added to the residual
            mha AS MATERIALIZED (
                SELECT x.layer, ARRAY(SELECT u.x + u.y FROM unnest(x.xs, y.ys) WITH ORDINALITY u(x, y, p) ORDER BY u.p) AS xs
                FROM x, merge_heads a, LATERAL (SELECT a.a[1] AS a OFFSET 0) one, LATERAL (
                    SELECT CASE WHEN cardinality(a.a) = 1
                           THEN ARRAY[ARRAY(SELECT inner_product(one.a, w.w) + w.b
                                            FROM attn_c_proj w WHERE w.layer = x.layer ORDER BY w.col)::vector]
                           ELSE columns_of(ARRAY(SELECT ARRAY(SELECT (inner_product(unnest(a.a), w.w) + w.b)::real)
                                                 FROM attn_c_proj w WHERE w.layer = x.layer ORDER BY w.col)) END AS ys) y
            ),
            ln_2_out AS MATERIALIZED (
                SELECT m.layer, ARRAY(SELECT as_weights(layer_norm(u.x, ln.g, ln.b))
                                      FROM unnest(m.xs) WITH ORDINALITY u(x, p) ORDER BY u.p) AS hs
                FROM mha m JOIN ln_2 ln ON ln.layer = m.layer
            ),
            -- gelu(linear(ln_2_out, c_fc)); OFFSET 0 keeps each inner product a value of its own (gelu, inlined,
            -- reads its argument 4 times)
            c_fc AS MATERIALIZED (
                SELECT h.layer, CASE WHEN cardinality(h.hs) = 1
                       THEN ARRAY[ARRAY(SELECT gelu(c.y) FROM (SELECT inner_product(one.h, w.w) + w.b AS y, w.col
                                                                FROM mlp_c_fc w WHERE w.layer = h.layer
                                                                ORDER BY w.col OFFSET 0) c ORDER BY c.col)::vector]
                       ELSE columns_of(ARRAY(SELECT ARRAY(SELECT gelu(c.y)::real
                                                          FROM (SELECT inner_product(unnest(h.hs), w.w) + w.b AS y OFFSET 0) c)
                                             FROM mlp_c_fc w WHERE w.layer = h.layer ORDER BY w.col)) END AS ys
                FROM ln_2_out h, LATERAL (SELECT h.hs[1] AS h OFFSET 0) one
            ),
            -- ...cut into chunks of c_proj_width for c_proj, whose rows hold a chunk of its inputs each
            hidden AS MATERIALIZED (
                SELECT f.layer, c AS chunk,
                       ARRAY(SELECT as_weights(subvector(unnest(f.ys), c * p.c_proj_width + 1, p.c_proj_width))) AS hs
                FROM c_fc f, params p, generate_series(0, vector_dims(f.ys[1]) / p.c_proj_width - 1) AS c
            ),
            -- c_proj as one partial product per chunk
            c_proj AS MATERIALIZED (
                SELECT CASE WHEN cardinality(h.hs) = 1
                       THEN ARRAY[ARRAY(SELECT inner_product(one.h, w.w) + w.b FROM mlp_c_proj w
                                        WHERE w.layer = h.layer AND w.chunk = h.chunk ORDER BY w.col)::vector]
                       ELSE columns_of(ARRAY(SELECT ARRAY(SELECT (inner_product(unnest(h.hs), w.w) + w.b)::real)
                                             FROM mlp_c_proj w WHERE w.layer = h.layer AND w.chunk = h.chunk
                                             ORDER BY w.col)) END AS ys
                FROM hidden h, LATERAL (SELECT h.hs[1] AS h OFFSET 0) one
            ),
            -- ffn: the chunks' partial products summed, added to the residual
            ffn AS (
                SELECT m.layer, ARRAY(SELECT u.x + y.y FROM unnest(m.xs) WITH ORDINALITY u(x, p)
                                      JOIN (SELECT y.p, sum(y.y) AS y FROM c_proj c, unnest(c.ys) WITH ORDINALITY y(y, p)
                                            GROUP BY y.p) y ON y.p = u.p ORDER BY u.p) AS xs
                FROM mha m
            )
            SELECT 'x', layer + 1, NULL::int, xs, NULL::head_cache FROM ffn
            -- the heads' recent keys and values, for the next step's tail or the next cache
            UNION ALL SELECT 'kv', layer, head, NULL, ROW(k, v)::head_cache FROM recent
            -- with gpt.inspect on: the heads' attention weights, a vector over all positions per new position
            UNION ALL SELECT 'attention', n.layer, n.head,
                             ARRAY(SELECT ARRAY(SELECT y / a.total
                                                FROM unnest(coalesce(a.eo::real[], '{}') || a.en::real[]) AS y)::vector
                                   FROM attention a WHERE a.head = n.head ORDER BY a.p), NULL
                      FROM qkv n WHERE (SELECT inspect FROM params))
        ),
        -- ln_f of the last position only (materialised: computed once, not once per wte row)
        last AS MATERIALIZED (
            SELECT as_weights(layer_norm(b.vs[cardinality(b.vs)], ln_f.g, ln_f.b)) AS x
            FROM blocks b, ln_f, params p WHERE b.kind = 'x' AND b.layer = p.n_layer
        ),
        -- logits = x @ wte.T, in id order: an ordered index scan reads each page of wte forwards (the loader writes
        -- its rows so), faster than a sequential scan. x and the temperature as scalar subqueries, computed once: a
        -- join would rescan them for every row of wte
        logits AS MATERIALIZED (
            SELECT wte.id, inner_product((SELECT x FROM last), wte.w) / (SELECT temperature FROM params) AS logit
            FROM wte ORDER BY wte.id
        ),
        -- sample: the top_n tokens by logit (ties: lower id), the first whose cumulative probability exceeds u
        top AS (
            SELECT id, logit, row_number() OVER (ORDER BY logit DESC, id) AS rank
            FROM (SELECT id, logit FROM logits ORDER BY logit DESC, id LIMIT (SELECT top_n FROM params)) t
        ),
        -- softmax over the whole vocabulary, shifted by the largest logit (the first of top): one more pass
        probs AS (
            SELECT t.id, t.rank, exp(t.logit - m.max) AS e, exp(t.logit - m.max) / z.total AS prob
            FROM top t, (SELECT logit AS max FROM top WHERE rank = 1) m,
                 LATERAL (SELECT sum(exp(l.logit - m.max)) AS total FROM logits l) z
        ),
        sample AS (
            SELECT s.id, s.prob
            FROM (SELECT id, rank, prob, sum(e) OVER (ORDER BY rank) / sum(e) OVER () AS cumulative,
                         count(*) OVER () AS n FROM probs) s,
                 (SELECT ('x' || substr(md5(p.seed || ':' || i.step), 1, 13))::bit(52)::bigint
                         / 4503599627370496.0 AS u
                  FROM params p, this_step i) draw
            WHERE s.cumulative > draw.u OR s.rank = s.n
            ORDER BY s.rank LIMIT 1
        )
        SELECT 'token', i.step, NULL::int, NULL::int, i.pos, s.id, s.prob, NULL::vector[], NULL::int[], NULL::head_cache[]
        FROM sample s, this_step i
        UNION ALL
        SELECT 'candidate', i.step, NULL, NULL, NULL, p.id, p.prob, NULL, NULL, NULL
        FROM probs p, this_step i
        UNION ALL
        -- what the next step starts from (nothing after the last step): the sampled token, and the heads' recent
        -- keys and values in (layer, head) order: within the chunk a 'state' with them as its tail; at the chunk's
        -- end a 'cache' with them added to each head's keys and values, base's caches and the recent parts zipped by
        -- two unnests in the select list (base's read in place, in one pass)
        SELECT CASE WHEN c.ends THEN 'cache' ELSE 'state' END, i.step, NULL, NULL, i.pos, NULL, NULL, NULL, ARRAY[s.id],
               CASE WHEN NOT c.ends THEN r.kvs
               ELSE ARRAY(
                   SELECT ROW(coalesce((h.old).k, '{}') || (h.new).k,
                              CASE WHEN h.old IS NULL THEN (h.new).v
                                   ELSE ARRAY(SELECT unnest((h.old).v) || unnest((h.new).v)) END)::head_cache
                   FROM (SELECT unnest(base.cache) AS old, unnest(r.kvs) AS new) h
                   ) END
        FROM sample s, this_step i, params p,
             (SELECT ARRAY(SELECT b.kv FROM blocks b WHERE b.kind = 'kv' ORDER BY b.layer, b.head) AS kvs) r,
             -- a chunk ends after the prompt's step (step 1) and then every chunk_steps steps
             LATERAL (SELECT (i.step - 1) % chunking.chunk_steps = 0 AS ends FROM chunking) c
        WHERE i.step < p.n_tokens AND s.id <> p.eot
        UNION ALL
        -- with gpt.inspect on: the attention weights, and the residual stream after each block (layer l + 1 is
        -- after block l) for the logit lens. The condition is a subquery so that it is checked once, before any
        -- scan of blocks
        SELECT b.kind, i.step, b.layer, b.head, NULL, NULL, NULL, b.vs, NULL, NULL
        FROM blocks b, this_step i
        WHERE (SELECT inspect FROM params) AND (b.kind = 'attention' OR b.kind = 'x' AND b.layer > 0)
        ) step
    )
    -- the chunk's rows but its states (the next chunk starts from its 'cache')
    SELECT * FROM chunk WHERE kind <> 'state'
    ) chunk
)
-- decode: each token as text and as bytes. A character split across tokens shows as U+FFFD in the text of
-- each part; the bytes put it together (clients decode the stream incrementally)
SELECT g.step, g.token, decode_utf8(t.bytes) AS text, t.bytes, g.prob
FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t
WHERE g.kind = 'token' AND g.step > 0;
