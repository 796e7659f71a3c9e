-- gpt-sql: GPT-2 text generation as one recursive SQL query (PostgreSQL >= 14, pgvector >= 0.7: runner/versions.py).
--
-- The model is the one on search_path (SET search_path = gpt2_124m, public). Parameters are settings:
--   SET gpt.prompt = 'Happy New Year!';  -- '' starts unconditionally from <|endoftext|>
--   SET gpt.prompts = '{"Happy New Year!", "Hello"}';  -- or several prompts at once (a text[]; wins over gpt.prompt)
--   SET gpt.tokens = 10;                 -- new tokens per prompt (each stops early at <|endoftext|>)
--   SET gpt.temperature = 1;             -- > 0
--   SET gpt.top_n = 5;                   -- sample among the n most likely tokens; 1 = greedy
--   SET gpt.top_p = 1;                   -- and of those, among the fewest whose probability reaches top_p
--   SET gpt.seed = 0;                    -- step k draws u = first 52 bits of md5('<seed>:<k>') / 2^52
--   SET gpt.seeds = '{1, 2}';            -- or one seed per prompt (a bigint[]; default: gpt.seed for each)
--   SET gpt.stop = '{"\n\n"}';           -- a prompt's generation ends where its text contains one (a text[])
--   SET gpt.logprobs = 0;                -- k > 0: each token's row also lists the k likeliest tokens (top)
--   SET gpt.task = generate;             -- or inspect (= SET gpt.inspect = on), score, embed, classify: each
--                                        -- task's file in sql/ sets it (score.sql, ...; see this file's end)
--   SET gpt.layer = '';                  -- embed: the residual stream after this block (0 = the first), not ln_f
-- One row per generated token, as it is produced: i (which prompt, from 1), step, token, its text, its bytes, its
-- probability (softmax of logits / temperature over the whole vocabulary) and, with logprobs, top. The prompts are
-- generated together: each step runs every unfinished prompt's new positions through each weight row at once.
-- Each CTE is named after its twin in runner/reference.py.
WITH RECURSIVE
-- settings: the parameters from the gpt.* settings (scalars as text). A model's SQL functions (generate, complete,
-- score, embed, classify, ...; loader/functions.py) are this same query with their arguments in this CTE's place
settings(prompts, tokens, temperature, top_n, seed, seeds, task, top_p, logprobs, stop, layer) AS (
    SELECT coalesce(nullif(current_setting('gpt.prompts', true), '')::text[],
                    ARRAY[coalesce(current_setting('gpt.prompt', true), 'Happy New Year!')]),
           current_setting('gpt.tokens', true), current_setting('gpt.temperature', true),
           current_setting('gpt.top_n', true), current_setting('gpt.seed', true),
           nullif(current_setting('gpt.seeds', true), '')::bigint[],
           coalesce(nullif(current_setting('gpt.task', true), ''),
                    CASE WHEN nullif(current_setting('gpt.inspect', true), '')::bool THEN 'inspect' END),
           current_setting('gpt.top_p', true), current_setting('gpt.logprobs', true),
           nullif(current_setting('gpt.stop', true), '')::text[], current_setting('gpt.layer', true)
),
-- params: the settings, with defaults, checked before any work; and the dimensions derived from the model: hd,
-- c_proj_width (how many of mlp_c_proj's inputs a row of it holds: the loader makes rows as wide as fit a page),
-- and kv_bytes, what one position's keys and values take in the cache (fp32 in every layer)
params AS (
    SELECT h.*, h.n_embd / h.n_head AS hd, (SELECT vector_dims(r.w) FROM mlp_c_proj r LIMIT 1) AS c_proj_width,
           2 * h.n_layer * h.n_embd * 4 AS kv_bytes, s.*
    FROM hparams h, settings,
         LATERAL (SELECT settings.prompts, coalesce(cardinality(settings.prompts), 0) AS n_prompts,
                         coalesce(nullif(settings.tokens, '')::int, 10) AS n_tokens,
                         coalesce(nullif(settings.temperature, '')::float8, 1) AS temperature,
                         coalesce(nullif(settings.top_n, '')::int, 5) AS top_n,
                         coalesce(settings.seeds,
                                  array_fill(coalesce(nullif(settings.seed, '')::bigint, 0),
                                             ARRAY[coalesce(cardinality(settings.prompts), 0)])) AS seeds,
                         coalesce(settings.task, 'generate') AS task,
                         coalesce(nullif(settings.top_p, '')::float8, 1) AS top_p,
                         coalesce(nullif(settings.logprobs, '')::int, 0) AS logprobs,
                         coalesce(settings.stop, '{}') AS stop,
                         nullif(settings.layer, '')::int AS layer) s
    WHERE CASE
        WHEN s.task NOT IN ('generate', 'inspect', 'score', 'embed', 'classify')
            THEN raise_error(format('gpt.task must be generate, inspect, score, embed or classify, got %s', s.task))
        WHEN s.n_prompts = 0 THEN raise_error(CASE WHEN s.task = 'classify' THEN 'no text to classify'
                                                   ELSE 'no prompts: give at least one' END)
        WHEN array_ndims(s.prompts) > 1 THEN raise_error('the prompts must be a one-dimensional array')
        WHEN array_position(s.prompts, NULL) IS NOT NULL
            THEN raise_error(CASE WHEN s.n_prompts = 1 THEN 'the prompt is NULL'
                                  WHEN s.task = 'classify' AND array_position(s.prompts, NULL) = 1
                                      THEN 'the text is NULL'
                                  WHEN s.task = 'classify'
                                      THEN format('choice %s is NULL', array_position(s.prompts, NULL) - 1)
                                  ELSE format('prompt %s is NULL', array_position(s.prompts, NULL)) END)
        WHEN s.task = 'classify' AND s.n_prompts < 2 THEN raise_error('no choices: give at least one')
        WHEN s.task = 'classify' AND array_position(s.prompts[2:], '') IS NOT NULL
            THEN raise_error(format('choice %s is empty', array_position(s.prompts[2:], '')))
        WHEN coalesce(cardinality(s.seeds), 0) <> s.n_prompts OR array_ndims(s.seeds) > 1
            THEN raise_error(format('%s seeds for %s prompts: give one seed per prompt', cardinality(s.seeds),
                                    s.n_prompts))
        WHEN array_position(s.seeds, NULL) IS NOT NULL
            THEN raise_error(format('seed %s is NULL', array_position(s.seeds, NULL)))
        WHEN s.n_tokens < 1 THEN raise_error(format('gpt.tokens must be at least 1, got %s', s.n_tokens))
        WHEN NOT s.temperature > 0 OR s.temperature IN ('Infinity', 'NaN')
            THEN raise_error(format('gpt.temperature must be a positive number, got %s', s.temperature))
        WHEN s.top_n NOT BETWEEN 1 AND h.n_vocab
            THEN raise_error(format('gpt.top_n must be between 1 and %s (the vocabulary), got %s', h.n_vocab, s.top_n))
        WHEN NOT (s.top_p > 0 AND s.top_p <= 1)
            THEN raise_error(format('gpt.top_p must be in (0, 1], got %s', s.top_p))
        WHEN s.logprobs NOT BETWEEN 0 AND h.n_vocab
            THEN raise_error(format('gpt.logprobs must be between 0 and %s (the vocabulary), got %s', h.n_vocab,
                                    s.logprobs))
        WHEN array_ndims(s.stop) > 1 THEN raise_error('the stop strings must be a one-dimensional array')
        WHEN array_position(s.stop, NULL) IS NOT NULL OR array_position(s.stop, '') IS NOT NULL
            THEN raise_error(format('stop string %s is empty', coalesce(array_position(s.stop, NULL),
                                                                         array_position(s.stop, ''))))
        WHEN s.layer NOT BETWEEN 0 AND h.n_layer - 1
            THEN raise_error(format('gpt.layer must be between 0 and %s (the blocks), got %s', h.n_layer - 1, s.layer))
        ELSE 0 END = 0
),
-- chars: each prompt's (i) characters with their class in GPT-2's pattern: L letter, N number, S space, O other
chars AS (
    SELECT p.i::int AS i, t.n AS ch, t.c,
           (SELECT cc.class FROM char_classes cc WHERE cc.lo <= ascii(t.c) ORDER BY cc.lo DESC LIMIT 1) AS cls
    FROM params, unnest(params.prompts) WITH ORDINALITY AS p(prompt, i),
         string_to_table(p.prompt, NULL) WITH ORDINALITY AS t(c, n)
),
-- contractions: 's 't 're 've 'm 'll 'd where an apostrophe can start a piece (not inside " '..." or "!'...")
contractions AS (
    SELECT i, ch, c, cls, lag(c) OVER w AS prev_c, lag(cls) OVER w AS prev_cls, lead(cls) OVER w AS next_cls,
           CASE WHEN c = '''' AND (lag(cls) OVER w IS NULL OR lag(cls) OVER w IN ('L', 'N')
                                   OR (lag(cls) OVER w = 'S' AND lag(c) OVER w <> ' '))
                THEN CASE WHEN lead(c) OVER w IN ('s', 't', 'm', 'd') THEN 2
                          WHEN lead(c) OVER w || lead(c, 2) OVER w IN ('re', 've', 'll') THEN 3
                          ELSE 0 END
                ELSE 0 END AS contraction
    FROM chars WINDOW w AS (PARTITION BY i ORDER BY ch)
),
-- pretokenize: where GPT-2's regex starts a new piece, decided from each character's neighbours
pretokenize AS (
    SELECT i, ch, c, CASE
        WHEN prev_cls IS NULL THEN 1
        WHEN lag(contraction) OVER w >= 2 OR lag(contraction, 2) OVER w = 3 THEN 0   -- inside a contraction
        WHEN lag(contraction, 2) OVER w = 2 OR lag(contraction, 3) OVER w = 3 THEN 1 -- just after one
        WHEN contraction > 0 THEN 1
        -- \s+(?!\S) leaves the last space of a run to the next piece; \s+ takes a run at the end
        WHEN cls = 'S' THEN (prev_cls <> 'S' OR coalesce(next_cls <> 'S', false))::int
        WHEN prev_c = ' ' THEN 0                                                       -- " ?\p{L}+" etc.
        ELSE (prev_cls <> cls)::int
    END AS starts
    FROM contractions WINDOW w AS (PARTITION BY i ORDER BY ch)
),
pieces AS (
    SELECT i, piece_no, string_agg(c, '' ORDER BY ch) AS piece
    FROM (SELECT i, ch, c, sum(starts) OVER (PARTITION BY i ORDER BY ch) AS piece_no FROM pretokenize) p
    GROUP BY i, piece_no
),
-- bpe: each distinct piece (of all prompts) as byte tokens, then one merge per step: the lowest-ranked adjacent pair
-- (leftmost on ties). The ranks of the adjacent pairs are kept beside the symbols (ranks[k] is that of symbols k,
-- k+1), so a step looks up only the two pairs its merge creates
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
-- encode: each prompt's token ids by position
encode AS (
    SELECT p.i, row_number() OVER (PARTITION BY p.i ORDER BY p.piece_no, t.ord)::int - 1 AS pos, t.token
    FROM pieces p JOIN bpe ON bpe.piece = p.piece AND bpe.done,
         unnest(bpe.symbols) WITH ORDINALITY AS t(token, ord)
),
-- prompt: the encoded prompts, if each fits in n_ctx with what is asked of it. An empty prompt is <|endoftext|>
-- alone; to score a text, and a text to classify, follow <|endoftext|>, which gives their first token a
-- probability (classify's choices follow the text)
prompt AS (
    SELECT e.i, e.pos, e.token
    FROM (SELECT e.*, count(*) OVER (PARTITION BY e.i) AS n,
                 count(*) FILTER (WHERE e.i = 1) OVER () AS n_text
          FROM (SELECT encode.i, encode.pos + (p.task = 'score' OR p.task = 'classify' AND encode.i = 1)::int AS pos,
                       encode.token
                FROM encode, params p
                UNION ALL
                SELECT q.i::int, 0, p.eot FROM params p, unnest(p.prompts) WITH ORDINALITY AS q(prompt, i)
                WHERE q.prompt = '' OR p.task = 'score' OR p.task = 'classify' AND q.i = 1) e) e, params p
    WHERE CASE WHEN p.task IN ('generate', 'inspect') AND e.n + p.n_tokens > p.n_ctx
               THEN raise_error(format('%s is %s tokens and %s new tokens were asked for: together at most n_ctx = '
                                       '%s fit', CASE WHEN p.n_prompts = 1 THEN 'the prompt'
                                                      ELSE format('prompt %s', e.i) END,
                                       e.n, p.n_tokens, p.n_ctx))
               WHEN p.task IN ('score', 'embed') AND e.n > p.n_ctx
               THEN raise_error(format('%s is %s tokens%s: at most n_ctx = %s fit',
                                       CASE WHEN p.n_prompts = 1 THEN 'the text' ELSE format('text %s', e.i) END,
                                       e.n, CASE WHEN p.task = 'score' THEN ' after <|endoftext|>' ELSE '' END,
                                       p.n_ctx))
               WHEN p.task = 'classify' AND e.n + CASE WHEN e.i = 1 THEN 0 ELSE e.n_text END > p.n_ctx
               THEN raise_error(format('the text%s is %s tokens after <|endoftext|>: at most n_ctx = %s fit',
                                       CASE WHEN e.i > 1 THEN format(' with choice %s', e.i - 1) ELSE '' END,
                                       e.n + CASE WHEN e.i = 1 THEN 0 ELSE e.n_text END, p.n_ctx))
               ELSE 0 END = 0
),
-- chunking: how many steps a chunk of batch runs (see there), and how many sequences a group generates together.
-- A chunk's steps read the cache it starts from in place and copy only the keys and values added since (the
-- tails); its end adds them to the cache, a copy of the whole cache. A chunk of L steps copies tails of about
-- L^2/2 positions and the cache once: L = ceil(sqrt(n_ctx)) keeps both small at any length. It depends on nothing
-- else, so a sequence's chunks end at the same steps alone or in a batch and its values are the same bits (the
-- attention's fp32 sums split where the cache ends). At most what work_mem holds of one sequence's tails (L^2
-- positions of kv_bytes). A group is as many sequences as fit work_mem twice: the caches a group's recursion emits
-- (one at each chunk's end) stay until the group is done, and so do a chunk's states (its tails) until the chunk
-- ends, each counted for the longest prompt. Larger batches run in groups, one after another (but classify's
-- choices, which read their text's cache, are one group)
chunking AS (
    SELECT c.chunk_steps,
           CASE WHEN p.task = 'classify' THEN p.n_prompts ELSE greatest(1, least(
               floor(m.work_mem / (p.kv_bytes * (len.n + p.n_tokens) * (2 + (p.n_tokens - 1) / c.chunk_steps))),
               floor(m.work_mem / (p.kv_bytes * least(c.chunk_steps, p.n_tokens) ^ 2 / 2)))) END::int AS group_size
    FROM params p, (SELECT max(n) AS n FROM (SELECT count(*) AS n FROM prompt GROUP BY i) l) len,
         LATERAL (SELECT pg_size_bytes(current_setting('work_mem')) AS work_mem) m,
         LATERAL (SELECT greatest(1, least(ceil(sqrt(p.n_ctx)), floor(sqrt(m.work_mem / p.kv_bytes))))::int
                      AS chunk_steps) c
),
-- sequences: each prompt's length, seed, and group (consecutive prompts, group_size at a time)
sequences AS MATERIALIZED (
    SELECT l.i, l.len, p.seeds[l.i] AS seed, (l.i - 1) / c.group_size AS grp
    FROM (SELECT i, count(*)::int AS len FROM prompt GROUP BY i) l, params p, chunking c
),
-- fork: classify's choices, each its text's last token and then its own tokens, all reading the cache of the
-- text's positions before (the first step runs those; none when the text is <|endoftext|> alone)
fork AS (
    SELECT ROW(f.i, f.past, f.lens, x.inputs, f.slots, f.texts)::seq_state AS state
    FROM (SELECT array_agg(c.i ORDER BY c.i) AS i, array_agg(t.len - 1 ORDER BY c.i) AS past,
                 array_agg(c.len + 1 ORDER BY c.i) AS lens, array_agg(1 ORDER BY c.i) AS slots,
                 array_agg(''::bytea ORDER BY c.i) AS texts
          FROM sequences c, (SELECT len FROM sequences WHERE i = 1) t WHERE c.i > 1) f,
         (SELECT array_agg(x.token ORDER BY x.i, x.pos) AS inputs
          FROM (SELECT c.i, -1 AS pos, last.token
                FROM sequences c, (SELECT p.token FROM prompt p JOIN sequences s ON s.i = p.i
                                   WHERE p.i = 1 AND p.pos = s.len - 1) last
                WHERE c.i > 1
                UNION ALL
                SELECT p.i, p.pos, p.token FROM prompt p WHERE p.i > 1) x) x,
         params p
    WHERE p.task = 'classify'
),
-- generate: each group's recursion (batch), one group after another. Row kinds:
--   'token'      (i, step, pos, token, prob, top) a prompt token (step 0) or a sampled one, with logprobs its top:
--                the likeliest tokens with their log-probabilities
--   'candidate'  (i, step, token, prob)  the top_n tokens the step sampled from
--   'cache'      (step, seqs, cache)     where a chunk starts: the unfinished sequences (seqs: see seq_state in
--                                        schema.sql) and the KV cache of their positions so far, a seq_cache each
--   'state'      (step, seqs, cache)     the same within a chunk, each cache only the positions since the chunk's
--                                        start (the tail; kept inside the chunk)
--   'score'      (i, step, pos, token, prob) with task score or classify: the log-probability (in prob) of the input
--                                        token at pos, given the positions before
--   'embedding'  (i, step, vs)           with task embed: the sequence's mean residual stream (see embedding)
--   'attention'  (step, layer, head, vs) with task inspect: the head's attention weights, a vector per new position
--   'x'          (step, layer, vs)       with task inspect: the residual stream after block layer - 1
-- The steps run in chunks of chunk_steps (see chunking), a recursion within this one: batch goes from cache to
-- cache, the inner one (chunk) from step to step. A step reads the chunk's cache in place, as a parameter (a LATERAL
-- subquery over the 'cache' row), and carries on only the tail: the working table is a recursion's only state, and
-- a CTE keeps every row its recursion emits until the query ends, so a whole cache carried by every step would be
-- copied several times a step and kept once per step. The chunk's last step adds the tail to the cache, once.
-- Within a step, the new positions of all the sequences travel together: activations are one vector[] (a vector per
-- position, the sequences' one after another), so each weight row is read once per layer and multiplied with every
-- new position while it is at hand; only attention and sampling look at which sequence a position is of.
generate AS (
    SELECT b.* FROM (SELECT DISTINCT grp FROM sequences ORDER BY grp) g, LATERAL (WITH RECURSIVE
    batch AS (
        SELECT 'token' AS kind, p.i, 0 AS step, NULL::int AS layer, NULL::int AS head, p.pos, p.token,
               NULL::float8 AS prob, NULL::jsonb AS top, NULL::vector[] AS vs, NULL::seq_state AS seqs,
               NULL::seq_cache[] AS cache
        FROM prompt p JOIN sequences s ON s.i = p.i WHERE s.grp = g.grp
        UNION ALL
        -- the group's first step: its prompts from their first position (classify: the text but its last token;
        -- or, when that is nothing, the choices at once)
        SELECT 'cache', NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               CASE WHEN pr.task <> 'classify' THEN st.seqs
                    WHEN t.len = 1 THEN (SELECT f.state FROM fork f)
                    ELSE ROW(ARRAY[1], ARRAY[0], ARRAY[t.len - 1],
                             ARRAY(SELECT p.token FROM prompt p WHERE p.i = 1 AND p.pos < t.len - 1 ORDER BY p.pos),
                             ARRAY[1], ARRAY[''::bytea])::seq_state END,
               NULL
        FROM params pr, (SELECT len FROM sequences WHERE i = 1) t,
             LATERAL (SELECT ROW(array_agg(s.i ORDER BY s.i), array_agg(0 ORDER BY s.i), array_agg(s.len ORDER BY s.i),
                                 ARRAY(SELECT p.token FROM prompt p JOIN sequences ps ON ps.i = p.i WHERE ps.grp = g.grp
                                       ORDER BY p.i, p.pos),
                                 array_agg(s.slot ORDER BY s.i), array_agg(''::bytea ORDER BY s.i))::seq_state AS seqs
                      FROM (SELECT s.*, row_number() OVER (ORDER BY s.i)::int AS slot FROM sequences s
                            WHERE s.grp = g.grp) s) st
        UNION ALL
        SELECT chunk.* FROM (SELECT b.* FROM batch b WHERE b.kind = 'cache' OFFSET 0) base, LATERAL (WITH RECURSIVE
        -- chunk: the steps from a 'cache' row (base): the first from base with empty tails, each next from the
        -- 'state' its step before ended with (a chunk's last step ends with a 'cache' instead, the last with neither)
        chunk AS (
            SELECT 'state' AS kind, NULL::int AS i, base.step, NULL::int AS layer, NULL::int AS head, NULL::int AS pos,
                   NULL::int AS token, NULL::float8 AS prob, NULL::jsonb AS top, NULL::vector[] AS vs, base.seqs,
                   NULL::seq_cache[] AS cache
            UNION ALL
            SELECT step.*
            FROM (SELECT s.* FROM chunk s WHERE s.kind = 'state' OFFSET 0) state, LATERAL (WITH RECURSIVE
            -- live: the sequences this step runs, in order (seq): where their new positions start (pos, after n_past
            -- positions), how many they are (len), where they are among the step's positions (from off + 1), and the
            -- cache they read in base (slot), which holds their first n_base positions
            live AS MATERIALIZED (
                SELECT s.seq::int AS seq, s.i, s.pos, s.len, (sum(s.len) OVER (ORDER BY s.seq) - s.len)::int AS off,
                       s.slot, ((base.seqs).past)[array_position((base.seqs).i, s.i)] AS n_base
                FROM unnest((state.seqs).i, (state.seqs).past, (state.seqs).lens, (state.seqs).slots)
                     WITH ORDINALITY AS s(i, pos, len, slot, seq)
            ),
            -- inputs: the positions this step runs (r: their order in the step), and their tokens
            inputs AS (
                SELECT l.seq, l.off + u.n::int AS r, l.pos + u.n::int - 1 AS pos, u.token
                FROM live l, unnest(((state.seqs).inputs)[l.off + 1:l.off + l.len]) WITH ORDINALITY AS u(token, n)
            ),
            -- this_step: the number of this step
            this_step AS (SELECT state.step + 1 AS step),
            -- embed: token + position embeddings of the new positions, in order (in fp32 whatever the weights' type)
            embed AS (
                SELECT array_agg(wte.w::vector + wpe.w::vector ORDER BY i.r) AS xs
                FROM inputs i JOIN wte ON wte.id = i.token JOIN wpe ON wpe.pos = i.pos
            ),
            -- transformer_block, once per layer: x + mha(layer_norm(x)), then x + ffn(layer_norm(x))
            blocks AS (
                SELECT 'x' AS kind, 0 AS layer, NULL::int AS head, NULL::int AS seq, xs AS vs, NULL::head_cache AS kv
                FROM embed
                UNION ALL
                (WITH
                x AS (SELECT b.layer, b.vs AS xs FROM blocks b, params WHERE b.kind = 'x' AND b.layer < params.n_layer),
                ln_1_out AS MATERIALIZED (
                    SELECT x.layer, ARRAY(SELECT as_weights(layer_norm(u.x, ln.g, ln.b))
                                          FROM unnest(x.xs) WITH ORDINALITY u(x, p) ORDER BY u.p) AS hs
                    FROM x JOIN ln_1 ln ON ln.layer = x.layer
                ),
                -- linear(ln_1_out, c_attn) -> q | k | v, one vector per new position (linear: see weights.sql; its
                -- inputs are as_weights(...), in the weights' type, vector or halfvec: see schema.sql)
                c_attn AS MATERIALIZED (
                    SELECT h.layer, y.ys FROM ln_1_out h, LATERAL linear(h.hs, 'c_attn', h.layer, 0) y
                ),
                -- split_heads: q and k of each head as one hd-vector per new position; v as one vector over the new
                -- positions per column (the cache keeps values transposed). lh: the head's place in a sequence's cache
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
                -- recent: each sequence's and head's keys and values since the chunk's cache: the state's tail, then
                -- the sequence's new positions' (own: its part of the step's; all of it when it is the only one)
                recent AS MATERIALIZED (
                    SELECT n.layer, n.head, n.lh, l.seq, own.q, coalesce((t.c).k, '{}') || own.k AS k,
                           CASE WHEN t.c IS NULL THEN own.v ELSE ARRAY(SELECT unnest((t.c).v) || unnest(own.v)) END AS v
                    FROM qkv n, live l,
                         LATERAL (SELECT (state.cache[l.seq]).heads[n.lh] AS c OFFSET 0) t,
                         LATERAL (SELECT n.q[l.off + 1:l.off + l.len] AS q, n.k[l.off + 1:l.off + l.len] AS k,
                                         CASE WHEN l.len = cardinality(n.q) THEN n.v
                                              ELSE ARRAY(SELECT subvector(unnest(n.v), l.off + 1, l.len)) END AS v
                                  OFFSET 0) own
                ),
                -- attention: softmax(q k^T / sqrt(hd) + causal mask) @ v, one row per sequence, head and new position,
                -- with the head's part of the sequence's cache in base found once (past: a walk along base's caches,
                -- its element used in place). From the inside out: the position's scores against the head's cached
                -- keys and its recent ones up to itself (the causal mask is the LIMIT), their max, softmax's
                -- numerators exp(s - max) over the cached positions (eo, NULL in the first chunk) and over the recent
                -- ones (en, zeros past the mask) and their sum, then o: per value column, the numerators' products
                -- with its cached values and its recent ones, over the sum. OFFSET 0 computes each stage once: a
                -- flattened one would be evaluated again at every use, e.g. per column
                attention AS MATERIALIZED (
                    SELECT a.seq, a.head, a.p, a.eo, a.en, a.total,
                           ARRAY(SELECT ((coalesce(y.old, 0) + y.new) / a.total)::real
                                 FROM (SELECT inner_product(a.eo, unnest((a.past).v)) AS old,
                                              inner_product(a.en, unnest(a.v)) AS new) y) AS o
                    FROM (SELECT n.seq, n.head, n.v, past.c AS past, e.p,
                                 CASE WHEN l.n_base > 0 THEN e.e[:l.n_base]::vector END AS eo,
                                 (e.e[l.n_base + 1:] || array_fill(0::float8, ARRAY[cardinality(n.k) + l.n_base - cardinality(e.e)]))::vector AS en,
                                 (SELECT sum(y) FROM unnest(e.e) AS y) AS total
                          FROM recent n JOIN live l ON l.seq = n.seq, params pr,
                               LATERAL (SELECT (base.cache[l.slot]).heads[n.lh] AS c OFFSET 0) past, LATERAL (
                              SELECT s.p, ARRAY(SELECT exp0(unnest(s.s) - s.max)) AS e
                              FROM (SELECT s.p, s.s, (SELECT max(y) FROM unnest(s.s) AS y) AS max
                                    FROM (SELECT q.p, ARRAY(SELECT inner_product(q.q, k.k) / sqrt(pr.hd)
                                                            FROM (SELECT unnest((past.c).k) AS k UNION ALL SELECT unnest(n.k)) k
                                                            LIMIT l.pos + q.p) AS s
                                          FROM unnest(n.q) WITH ORDINALITY AS q(q, p) OFFSET 0) s OFFSET 0) s OFFSET 0) e
                          OFFSET 0) a
                ),
                -- heads: each head's outputs at the new positions, o[position][column], in the step's order
                heads AS MATERIALIZED (SELECT head, array_agg(o ORDER BY seq, p) AS o FROM attention GROUP BY head),
                -- merge_heads: per new position, the heads' outputs side by side
                merge_heads AS MATERIALIZED (
                    SELECT ARRAY(SELECT as_weights(ARRAY(SELECT unnest(h.o[p:p][:]) FROM heads h ORDER BY h.head)::vector)
                                 FROM generate_series(1, cardinality(x.xs)) AS p ORDER BY p) AS a
                    FROM x
                ),
                -- mha: the heads' output through attn_c_proj, added to the residual
                mha AS MATERIALIZED (
                    SELECT x.layer, ARRAY(SELECT u.x + u.y FROM unnest(x.xs, y.ys) WITH ORDINALITY u(x, y, p) ORDER BY u.p) AS xs
                    FROM x, merge_heads a, LATERAL linear(a.a, 'attn_c_proj', x.layer, 0) y
                ),
                ln_2_out AS MATERIALIZED (
                    SELECT m.layer, ARRAY(SELECT as_weights(layer_norm(u.x, ln.g, ln.b))
                                          FROM unnest(m.xs) WITH ORDINALITY u(x, p) ORDER BY u.p) AS hs
                    FROM mha m JOIN ln_2 ln ON ln.layer = m.layer
                ),
                -- gelu(linear(ln_2_out, c_fc)), gelu taken of each output as it is made
                c_fc AS MATERIALIZED (
                    SELECT h.layer, y.ys FROM ln_2_out h, LATERAL linear(h.hs, 'c_fc', h.layer, 0, 'gelu') y
                ),
                -- ...cut into chunks of c_proj_width for c_proj, whose rows hold a chunk of its inputs each
                hidden AS MATERIALIZED (
                    SELECT f.layer, c AS chunk,
                           ARRAY(SELECT as_weights(subvector(unnest(f.ys), c * p.c_proj_width + 1, p.c_proj_width))) AS hs
                    FROM c_fc f, params p, generate_series(0, vector_dims(f.ys[1]) / p.c_proj_width - 1) AS c
                ),
                -- c_proj as one partial product per chunk (mlp_c_proj's rows hold a chunk of its inputs each)
                c_proj AS MATERIALIZED (
                    SELECT y.ys FROM hidden h, LATERAL linear(h.hs, 'mlp_c_proj', h.layer, h.chunk) y
                ),
                -- ffn: the chunks' partial products summed, added to the residual
                ffn AS (
                    SELECT m.layer, ARRAY(SELECT u.x + y.y FROM unnest(m.xs) WITH ORDINALITY u(x, p)
                                          JOIN (SELECT y.p, sum(y.y) AS y FROM c_proj c, unnest(c.ys) WITH ORDINALITY y(y, p)
                                                GROUP BY y.p) y ON y.p = u.p ORDER BY u.p) AS xs
                    FROM mha m
                )
                SELECT 'x', layer + 1, NULL::int, NULL::int, xs, NULL::head_cache FROM ffn
                -- the heads' recent keys and values, for the next step's tail or the next cache
                UNION ALL SELECT 'kv', layer, head, seq, NULL, ROW(k, v)::head_cache FROM recent
                -- with gpt.inspect on: the heads' attention weights, a vector over all positions per new position
                UNION ALL SELECT 'attention', n.layer, n.head, NULL,
                                 ARRAY(SELECT ARRAY(SELECT y / a.total
                                                    FROM unnest(coalesce(a.eo::real[], '{}') || a.en::real[]) AS y)::vector
                                       FROM attention a WHERE a.head = n.head ORDER BY a.seq, a.p), NULL
                          FROM qkv n WHERE (SELECT task = 'inspect' FROM params))
            ),
            -- ln_f of each sequence's last position, to sample from (materialised: computed once, not once per wte
            -- row)
            last AS MATERIALIZED (
                SELECT l.seq, as_weights(layer_norm(b.vs[l.off + l.len], ln_f.g, ln_f.b)) AS x
                FROM blocks b, ln_f, params p, live l
                WHERE b.kind = 'x' AND b.layer = p.n_layer AND p.task IN ('generate', 'inspect')
            ),
            -- logits = x @ wte.T / temperature, in id order: an ordered index scan reads each page of wte forwards (the
            -- loader writes its rows so), faster than a sequential scan. x and the temperature as scalar subqueries,
            -- computed once: a join would rescan them for every row of wte. With one sequence, a row per token; with
            -- several (batch_logits), an array per token of their logits (ls[seq]), taken while the row is at hand.
            -- Each is empty in the other case (rows of both shapes in one CTE, with NULLs, are slower to store and
            -- read: 5% of a decode step)
            logits AS MATERIALIZED (
                SELECT wte.id, inner_product((SELECT x FROM last), wte.w) / (SELECT temperature FROM params) AS logit
                FROM wte WHERE (SELECT count(*) FROM last) = 1 ORDER BY wte.id
            ),
            batch_logits AS MATERIALIZED (
                SELECT wte.id, ARRAY(SELECT inner_product(unnest((SELECT array_agg(x ORDER BY seq) FROM last)), wte.w)
                                            / (SELECT temperature FROM params)) AS ls
                FROM wte WHERE (SELECT count(*) FROM last) > 1 ORDER BY wte.id
            ),
            -- top: per sequence, the most likely tokens by logit (ties: lower id): the top_n to sample from, or the
            -- logprobs ones to list, whichever are more. The n-th logit of some 100 n tokens (bound) is at most the
            -- n-th of them all, so only the tokens at least as likely go to the sort: a few hundred, not all (a sort
            -- copies every row it is given: 9 ms a sequence, against 3 for this)
            top AS (
                SELECT l.seq, t.id, t.logit, row_number() OVER (PARTITION BY l.seq ORDER BY t.logit DESC, t.id) AS rank
                FROM last l, params p, LATERAL (SELECT greatest(p.top_n, p.logprobs) AS n) n,
                     LATERAL (SELECT min(b.logit) AS logit
                              FROM (SELECT b.logit FROM (SELECT g.logit
                                                         FROM (SELECT logit FROM logits
                                                               UNION ALL SELECT ls[l.seq] FROM batch_logits) g
                                                         LIMIT 100 * n.n) b
                                    ORDER BY b.logit DESC LIMIT n.n) b) bound,
                     LATERAL (SELECT g.id, g.logit
                              FROM (SELECT id, logit FROM logits UNION ALL SELECT id, ls[l.seq] FROM batch_logits) g
                              WHERE g.logit >= bound.logit
                              ORDER BY g.logit DESC, g.id LIMIT n.n) t
            ),
            -- softmax over the whole vocabulary, shifted by the largest logit (the first of top): one more pass, over
            -- whichever of logits and batch_logits has rows (the sum of none is NULL; a UNION ALL of the two costs a
            -- call per row). OFFSET 0 sums once per sequence: flattened into the join, m.total would be summed at each
            -- of its uses
            probs AS (
                SELECT t.seq, t.id, t.rank, exp0(t.logit - m.max) AS e, exp0(t.logit - m.max) / m.total AS prob,
                       t.logit - m.max - ln(m.total) AS logprob
                FROM top t JOIN (SELECT t.seq, t.logit AS max,
                                        coalesce((SELECT sum(exp0(logit - t.logit)) FROM logits),
                                                 (SELECT sum(exp0(ls[t.seq] - t.logit)) FROM batch_logits)) AS total
                                 FROM top t WHERE t.rank = 1 OFFSET 0) m ON m.seq = t.seq
            ),
            -- top_logprobs: with logprobs k, each sequence's k likeliest tokens and their log-probabilities
            top_logprobs AS (
                SELECT pr.seq, jsonb_agg(jsonb_build_object('token', pr.id, 'text', decode_utf8(t.bytes),
                                                            'logprob', pr.logprob) ORDER BY pr.rank) AS top
                FROM probs pr JOIN tokens t ON t.id = pr.id, params p
                WHERE pr.rank <= p.logprobs
                GROUP BY pr.seq
            ),
            -- nucleus: of the top_n candidates, the fewest (likeliest first) whose share of their probability
            -- reaches top_p: each whose likelier ones' share is below it (all of them at top_p = 1)
            nucleus AS (
                SELECT c.* FROM (SELECT pr.*, coalesce(sum(pr.e) OVER (PARTITION BY pr.seq ORDER BY pr.rank ROWS
                                                                       BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                                               / sum(pr.e) OVER (PARTITION BY pr.seq) AS before
                                 FROM probs pr, params p WHERE pr.rank <= p.top_n) c, params p
                WHERE p.top_p >= 1 OR c.before < p.top_p
            ),
            -- sample: per sequence, the first of the nucleus whose cumulative probability (within it) exceeds u
            sample AS (
                SELECT DISTINCT ON (s.seq) s.seq, s.id, s.prob
                FROM (SELECT seq, id, rank, prob, sum(e) OVER w / sum(e) OVER (PARTITION BY seq) AS cumulative,
                             count(*) OVER (PARTITION BY seq) AS n
                      FROM nucleus WINDOW w AS (PARTITION BY seq ORDER BY rank)) s
                     JOIN live l ON l.seq = s.seq JOIN sequences q ON q.i = l.i,
                     LATERAL (SELECT ('x' || substr(md5(q.seed || ':' || i.step), 1, 13))::bit(52)::bigint
                                     / 4503599627370496.0 AS u
                              FROM this_step i) draw
                WHERE s.cumulative > draw.u OR s.rank = s.n
                ORDER BY s.seq, s.rank
            ),
            -- scored: with task score, or classify's choices, each new position's log-probability of the input token
            -- after it (a sequence's last position has none): log softmax of its logits (temperature 1), that is
            -- -ln(sum over the vocabulary of exp(logit - the token's logit)). One scan of wte takes every scored
            -- position's sum at once (score_sums): per token a vector of its terms, one per position, which pgvector's
            -- avg sums in float8 (sum = n_vocab * mean). A term is at most e^80, which a vector's float4 holds: a sum
            -- of e^79 or more may hold a cut term, and that position is summed again exactly, shifted by its largest
            -- logit (a token that unlikely; the pass costs a scan of wte). A term below e^-745 (where exp underflows,
            -- an error in PostgreSQL) is taken as e^-745, which the vector's float4 holds as 0, as it would exp0's 0:
            -- exp0, inlined, reads its argument twice, so it took each product twice (a third of the pass)
            scored_x AS MATERIALIZED (
                SELECT row_number() OVER (ORDER BY i.r) AS j, i.seq, nx.pos, nx.token, x.x,
                       inner_product(x.x, w.w) AS logit
                FROM inputs i JOIN inputs nx ON nx.seq = i.seq AND nx.r = i.r + 1 JOIN live l ON l.seq = i.seq
                     JOIN wte w ON w.id = nx.token, blocks b, ln_f, params p,
                     LATERAL (SELECT as_weights(layer_norm(b.vs[i.r], ln_f.g, ln_f.b)) AS x) x
                WHERE (p.task = 'score' OR p.task = 'classify' AND l.i > 1) AND b.kind = 'x' AND b.layer = p.n_layer
            ),
            score_sums AS MATERIALIZED (
                SELECT avg(ARRAY(SELECT exp(greatest(least(inner_product(u.x, wte.w) - u.logit, 80), -745))
                                 FROM unnest((SELECT array_agg(x ORDER BY j) FROM scored_x),
                                             (SELECT array_agg(logit ORDER BY j) FROM scored_x)) AS u(x, logit)
                                )::vector)::real[] AS mean,
                       count(*) AS n
                FROM wte WHERE EXISTS (SELECT FROM scored_x)
            ),
            scored AS (
                SELECT s.seq, s.pos, s.token,
                       CASE WHEN z.total < exp(79) THEN -ln(z.total)
                            ELSE (SELECT s.logit - m.max - ln(sum(exp0(inner_product(s.x, w.w) - m.max)))
                                  FROM wte w, (SELECT max(inner_product(s.x, w.w)) AS max FROM wte w) m
                                  GROUP BY m.max) END AS logprob
                FROM scored_x s, LATERAL (SELECT m.mean[s.j] * m.n AS total FROM score_sums m) z
            ),
            -- embedding: with task embed, each sequence's residual stream after block layer, or after the last and
            -- ln_f when layer is NULL, averaged over its positions (pgvector's avg: sums in float8)
            embedding AS (
                SELECT l.seq, (SELECT avg(CASE WHEN p.layer IS NULL THEN layer_norm(u.x, ln_f.g, ln_f.b) ELSE u.x END)
                               FROM unnest(b.vs[l.off + 1:l.off + l.len]) AS u(x)) AS v
                FROM live l, blocks b, ln_f, params p
                WHERE p.task = 'embed' AND b.kind = 'x' AND b.layer = coalesce(p.layer + 1, p.n_layer)
            ),
            -- next: the sequences that go on, in order: not at <|endoftext|> nor at the last step, and whose text does
            -- not contain a stop string; with their sampled tokens, texts, and keys and values of this step in (layer,
            -- head) order, each with its tail before. For classify, after the text's positions, the text: its cache is
            -- what the choices read
            next AS MATERIALIZED (
                SELECT row_number() OVER (ORDER BY l.seq) AS seq, l.i, l.slot, l.pos + l.len AS pos, s.id AS token,
                       s.text, ROW(ARRAY(SELECT b.kv FROM blocks b WHERE b.kind = 'kv' AND b.seq = l.seq
                                         ORDER BY b.layer, b.head))::seq_cache AS kv
                FROM live l JOIN (SELECT s.seq, s.id, ((state.seqs).texts)[s.seq] || t.bytes AS text
                                  FROM sample s JOIN tokens t ON t.id = s.id) s ON s.seq = l.seq,
                     params p, this_step i
                WHERE p.task = 'generate' AND i.step < p.n_tokens AND s.id <> p.eot
                  AND NOT EXISTS (SELECT FROM unnest(p.stop) AS x(stop)
                                  WHERE position(convert_to(x.stop, 'UTF8') IN s.text) > 0)
                UNION ALL
                SELECT 1, l.i, l.slot, l.pos + l.len, NULL, NULL,
                       ROW(ARRAY(SELECT b.kv FROM blocks b WHERE b.kind = 'kv' AND b.seq = l.seq
                                 ORDER BY b.layer, b.head))::seq_cache
                FROM live l, params p WHERE p.task = 'classify' AND l.i = 1
            )
            SELECT 'token', l.i, i.step, NULL::int, NULL::int, l.pos + l.len, s.id, s.prob, a.top, NULL::vector[],
                   NULL::seq_state, NULL::seq_cache[]
            FROM sample s JOIN live l ON l.seq = s.seq LEFT JOIN top_logprobs a ON a.seq = s.seq, this_step i
            UNION ALL
            SELECT 'candidate', l.i, i.step, NULL, NULL, NULL, p.id, p.prob, NULL, NULL, NULL, NULL
            FROM probs p JOIN live l ON l.seq = p.seq, this_step i, params pr WHERE p.rank <= pr.top_n
            UNION ALL
            SELECT 'score', l.i, i.step, NULL, NULL, s.pos, s.token, s.logprob, NULL, NULL, NULL, NULL
            FROM scored s JOIN live l ON l.seq = s.seq, this_step i
            UNION ALL
            SELECT 'embedding', l.i, i.step, NULL, NULL, NULL, NULL, NULL, NULL, ARRAY[e.v], NULL, NULL
            FROM embedding e JOIN live l ON l.seq = e.seq, this_step i
            UNION ALL
            -- what the next step starts from (nothing after the last step): within the chunk a 'state' with the
            -- recent keys and values as its tails (each sequence reading base's cache it read before); at the chunk's
            -- end a 'cache' with them added to each sequence's cache in base, its heads' caches and the recent ones
            -- zipped by two unnests in the select list (base's read in place, in one pass), and each sequence reading
            -- its own. classify's next is its fork
            SELECT CASE WHEN c.ends THEN 'cache' ELSE 'state' END, NULL, i.step, NULL, NULL, NULL, NULL, NULL, NULL,
                   NULL,
                   CASE WHEN p.task = 'classify' THEN (SELECT f.state FROM fork f)
                        ELSE ROW(n.i, n.past, n.lens, n.inputs, CASE WHEN c.ends THEN n.seqs ELSE n.slots END,
                                 n.texts)::seq_state END,
                   CASE WHEN NOT c.ends THEN n.kvs
                   ELSE ARRAY(
                       SELECT ROW(ARRAY(
                           SELECT ROW(coalesce((h.old).k, '{}') || (h.new).k,
                                      CASE WHEN h.old IS NULL THEN (h.new).v
                                           ELSE ARRAY(SELECT unnest((h.old).v) || unnest((h.new).v)) END)::head_cache
                           FROM (SELECT unnest((base.cache[x.slot]).heads) AS old, unnest((x.kv).heads) AS new) h
                           ))::seq_cache
                       FROM next x ORDER BY x.seq) END
            FROM this_step i, params p,
                 (SELECT array_agg(i ORDER BY seq) AS i, array_agg(pos ORDER BY seq) AS past,
                         array_agg(1 ORDER BY seq) AS lens, array_agg(token ORDER BY seq) AS inputs,
                         array_agg(seq::int ORDER BY seq) AS seqs, array_agg(slot ORDER BY seq) AS slots,
                         array_agg(text ORDER BY seq) AS texts, array_agg(kv ORDER BY seq) AS kvs FROM next) n,
                 -- a chunk ends after the prompts' step (step 1) and then every chunk_steps steps
                 LATERAL (SELECT (i.step - 1) % chunking.chunk_steps = 0 AS ends FROM chunking) c
            WHERE n.i IS NOT NULL
            UNION ALL
            -- with task inspect: the attention weights, and the residual stream after each block (layer l + 1 is
            -- after block l) for the logit lens. The condition is a subquery so that it is checked once, before any
            -- scan of blocks
            SELECT b.kind, NULL, i.step, b.layer, b.head, NULL, NULL, NULL, NULL, b.vs, NULL, NULL
            FROM blocks b, this_step i
            WHERE (SELECT task = 'inspect' FROM params) AND (b.kind = 'attention' OR b.kind = 'x' AND b.layer > 0)
            ) step
        )
        -- the chunk's rows but its states (the next chunk starts from its 'cache')
        SELECT * FROM chunk WHERE kind <> 'state'
        ) chunk
    )
    -- the group's rows but its caches
    SELECT * FROM batch WHERE kind <> 'cache'
    ) b
),
-- output: the generated tokens and their bytes. With stop strings, a prompt's tokens end where its text first
-- contains one, the token it starts in cut there: these rows come when the generation ends, since until then a
-- token's text may turn out to be a stop string's beginning
output AS (
    SELECT g.i, g.step, g.token, g.prob, g.top, t.bytes
    FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t
    WHERE g.kind = 'token' AND g.step > 0 AND (SELECT cardinality(stop) = 0 FROM params)
    UNION ALL
    SELECT o.i, o.step, o.token, o.prob, o.top,
           substring(o.bytes FROM 1 FOR least(length(o.bytes), c.cut - o.start)::int)
    FROM (SELECT g.i, g.step, g.token, g.prob, g.top, t.bytes,
                 coalesce(sum(length(t.bytes)) OVER (PARTITION BY g.i ORDER BY g.step ROWS BETWEEN UNBOUNDED PRECEDING
                                                     AND 1 PRECEDING), 0) AS start
          FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t
          WHERE g.kind = 'token' AND g.step > 0 AND (SELECT cardinality(stop) > 0 FROM params)) o,
         -- cut: where each prompt's text first contains a stop string (its length when none does)
         (SELECT t.i, coalesce(min(position(convert_to(x.stop, 'UTF8') IN t.text)) FILTER (
                                   WHERE position(convert_to(x.stop, 'UTF8') IN t.text) > 0) - 1,
                               length(t.text)) AS cut
          FROM (SELECT g.i, string_agg(tk.bytes, ''::bytea ORDER BY g.step) AS text
                FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) tk
                WHERE g.kind = 'token' AND g.step > 0 GROUP BY g.i) t, params p, unnest(p.stop) AS x(stop)
          GROUP BY t.i, t.text) c
    WHERE c.i = o.i AND o.start < c.cut
)
-- decode: what the query returns, one final SELECT per task. Each task's file in sql/ (text.sql, score.sql, ...)
-- sets a psql variable that picks its SELECT here (and is unset at once, so that a file stopped by an error leaves
-- none behind); runner/queries.py cuts out the same SELECT for the runner and the model's SQL functions
\if :{?gpt_text}
\unset gpt_text
-- complete: each prompt's completion as one text value (a character cut short becomes U+FFFD)
SELECT o.i, decode_utf8(coalesce(string_agg(o.bytes, ''::bytea ORDER BY o.step), ''::bytea)) AS completion
FROM output o
WHERE (SELECT CASE WHEN task = 'generate' THEN 0 ELSE raise_error(format(
                   'gpt.task is %1$s: run \i sql/%1$s.sql (or RESET gpt.task%2$s)', task,
                   CASE WHEN task = 'inspect' THEN ' and gpt.inspect' END)) END = 0 FROM params)
GROUP BY o.i
ORDER BY o.i;
\elif :{?gpt_texts}
\unset gpt_texts
-- completions: the prompts' completions as one text[], in the prompts' order
SELECT array_agg(c.completion ORDER BY c.i)
FROM (SELECT o.i, decode_utf8(coalesce(string_agg(o.bytes, ''::bytea ORDER BY o.step), ''::bytea)) AS completion
      FROM output o
      GROUP BY o.i) c;
\elif :{?gpt_next}
\unset gpt_next
-- next: the top_n candidates for the next token with their probabilities (softmax of logits / temperature)
SELECT g.token, decode_utf8(t.bytes) AS text, t.bytes, g.prob
FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t
WHERE g.kind = 'candidate' AND g.step = 1
  AND (SELECT CASE WHEN task = 'generate' THEN 0 ELSE raise_error(format(
                     'gpt.task is %1$s: run \i sql/%1$s.sql (or RESET gpt.task%2$s)', task,
                     CASE WHEN task = 'inspect' THEN ' and gpt.inspect' END)) END = 0 FROM params)
ORDER BY g.prob DESC, g.token;
\elif :{?gpt_score}
\unset gpt_score
-- score: with gpt.task = score, each text's tokens (pos from 0) and each one's log-probability given the tokens
-- before it (the first given <|endoftext|>)
SELECT g.i, g.pos - 1 AS pos, g.token, decode_utf8(t.bytes) AS text, g.prob AS logprob
FROM generate g, LATERAL (SELECT tokens.bytes FROM tokens WHERE tokens.id = g.token) t, params p
WHERE g.kind = 'score'
  AND CASE WHEN p.task <> 'score' THEN raise_error('SET gpt.task = score first: the score query reads what it keeps')
           ELSE 0 END = 0
ORDER BY g.i, g.pos;
\elif :{?gpt_perplexity}
\unset gpt_perplexity
-- perplexity: with gpt.task = score, each text's perplexity: exp of the mean of its tokens' negative
-- log-probabilities (none for an empty text)
SELECT g.i, exp(-avg(g.prob)) AS perplexity
FROM generate g, params p
WHERE g.kind = 'score'
  AND CASE WHEN p.task <> 'score'
           THEN raise_error('SET gpt.task = score first: the perplexity query reads what it keeps') ELSE 0 END = 0
GROUP BY g.i
ORDER BY g.i;
\elif :{?gpt_embed}
\unset gpt_embed
-- embed: with gpt.task = embed, each text's embedding: its residual stream after the last block and ln_f
-- (after block gpt.layer, if set), averaged over its positions
SELECT g.i, g.vs[1] AS embedding
FROM generate g, params p
WHERE g.kind = 'embedding'
  AND CASE WHEN p.task <> 'embed' THEN raise_error('SET gpt.task = embed first: the embed query reads what it keeps')
           ELSE 0 END = 0
ORDER BY g.i;
\elif :{?gpt_classify}
\unset gpt_classify
-- classify: with gpt.task = classify (gpt.prompts: the text, then the choices), each choice and its probability
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
\elif :{?gpt_inspect}
\unset gpt_inspect
-- inspect: with gpt.task = inspect (or gpt.inspect = on), what the model saw in the prompt. Rows by kind:
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
     LATERAL (SELECT ARRAY(SELECT ARRAY(SELECT inner_product(unnest(h.hs), w.w)::real)
                           FROM wte w ORDER BY w.id) AS logits
              FROM (SELECT ARRAY(SELECT as_weights(layer_norm(unnest(x.vs), ln_f.g, ln_f.b))) AS hs FROM ln_f) h
              OFFSET 0) m,
     LATERAL (SELECT c.pos, array_position(c.logits, c.top) - 1 AS token,
                     1 / (SELECT sum(exp0(y::float8 - c.top)) FROM unnest(c.logits) AS y) AS prob
              FROM (SELECT c.pos, c.logits, (SELECT max(y) FROM unnest(c.logits) AS y) AS top
                    FROM (SELECT j AS pos, ARRAY(SELECT unnest(m.logits[:][j:j])) AS logits
                          FROM generate_series(1, cardinality(x.vs)) AS j OFFSET 0) c OFFSET 0) c) l
WHERE x.kind = 'x' AND x.step = 1
ORDER BY kind DESC, layer, head, pos;
\elif :{?gpt_tokenize}
\unset gpt_tokenize
-- tokenize: the prompt's token ids and their bytes
SELECT e.pos, e.token, (SELECT t.bytes FROM tokens t WHERE t.id = e.token) AS bytes
FROM encode e
ORDER BY e.pos;
\elif :{?gpt_ids}
\unset gpt_ids
-- ids: the prompt's token ids as one array
SELECT coalesce(array_agg(e.token ORDER BY e.pos), '{}') FROM encode e;
\else
-- generate: a row per token, as text and as bytes. A character split across tokens shows as U+FFFD in the text of
-- each part; the bytes put it together (clients decode the stream incrementally). Another task's rows come from its
-- file: with gpt.task set to one, an error that names it
SELECT o.i, o.step, o.token, decode_utf8(o.bytes) AS text, o.bytes, o.prob, o.top AS alternatives
FROM output o
WHERE (SELECT CASE WHEN task = 'generate' THEN 0 ELSE raise_error(format(
                   'gpt.task is %1$s: run \i sql/%1$s.sql (or RESET gpt.task%2$s)', task,
                   CASE WHEN task = 'inspect' THEN ' and gpt.inspect' END)) END = 0 FROM params);
\endif
