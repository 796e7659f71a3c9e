-- gpt-sql: the tables one GPT-2 model is loaded into. Each model lives in its own schema (e.g. gpt2_124m);
-- the loader runs this file with that schema first on search_path, and the query finds the model the same way.
-- Weight matrices are stored one output column per row, so `x @ w + b` is one inner_product per row and the
-- bias sits beside its column. Every vector is at most n_embd long and STORAGE PLAIN: an fp32 vector(768) is
-- 3 KB, over the 2 KB TOAST threshold, and out-of-line storage triples the cost of reading a row.

-- dimensions; the query reads every size from here
CREATE TABLE hparams (
    n_vocab int NOT NULL,
    n_ctx   int NOT NULL,
    n_embd  int NOT NULL,
    n_head  int NOT NULL,
    n_layer int NOT NULL,
    eot     int NOT NULL,          -- id of <|endoftext|>: stops generation, starts an empty prompt
    source  text NOT NULL,         -- the checkpoint it came from
    n_params bigint NOT NULL,
    dtype   text NOT NULL DEFAULT 'float32' CHECK (dtype IN ('float32', 'float16')),  -- of the weight matrices
    loaded_at timestamptz NOT NULL DEFAULT now()
);

-- tokenizer: token id <-> its bytes (and its string in GPT-2's byte-to-unicode alphabet)
CREATE TABLE tokens (id int PRIMARY KEY, piece text NOT NULL, bytes bytea NOT NULL);
-- BPE merges as token-id pairs: (a, b) -> merged, lowest rank first
CREATE TABLE merges (a int NOT NULL, b int NOT NULL, rank int NOT NULL, merged int NOT NULL, PRIMARY KEY (a, b));
-- the single-byte token for each byte value (GPT-2's byte<->unicode map, resolved to ids)
CREATE TABLE byte_tokens (byte int PRIMARY KEY, token int NOT NULL);
-- Unicode classes of GPT-2's pre-tokenizer as a partition of code points: [lo, next lo) has class
-- L (\p{L}), N (\p{N}), S (\s) or O (anything else), computed with Python's `regex` module
CREATE TABLE char_classes (lo int PRIMARY KEY, class text NOT NULL);

-- embeddings
CREATE TABLE wte (id int PRIMARY KEY, w vector NOT NULL);
CREATE TABLE wpe (pos int PRIMARY KEY, w vector NOT NULL);

-- layer norms; ln_f is the final one
CREATE TABLE ln_1 (layer int PRIMARY KEY, g vector NOT NULL, b vector NOT NULL);
CREATE TABLE ln_2 (layer int PRIMARY KEY, g vector NOT NULL, b vector NOT NULL);
CREATE TABLE ln_f (g vector NOT NULL, b vector NOT NULL);

-- weights: every linear's rows, one output column each, as one table partitioned by matrix, so that a query naming
-- the matrix by a constant reads that matrix's table alone, with no step between its rows and their products (a
-- UNION ALL view of the four left a Result node over each row: 7 ms a decode step). The matrices:
-- - attention: c_attn (n_embd -> 3 n_embd: q | k | v) and its output projection c_proj;
-- - MLP: c_fc (n_embd -> 4 n_embd), then c_proj (4 n_embd -> n_embd) as chunks of its input rows, each stored one
--   output column per row. A chunk is as many inputs as fit a page (all 4 n_embd where they do; the loader's
--   c_proj_chunk_width): fewer, wider rows read faster. b is the column's bias in chunk 0 and 0 in the others, so
--   the sum of the chunks' products is x @ w + b. The other matrices' rows hold all their inputs: chunk 0.
-- The loader copies each matrix's rows into its partition (matrix and chunk by default); matrix comes last in the
-- row, where its few bytes need no alignment, and first in the key, so that the scan checks it in the index, not in
-- each row (a filter on the row cost what the view's Result node did)
CREATE TABLE weights (layer int, chunk int, col int, w vector NOT NULL, b real NOT NULL, matrix text NOT NULL,
                      PRIMARY KEY (matrix, layer, chunk, col)) PARTITION BY LIST (matrix);
ALTER TABLE weights ALTER COLUMN w SET STORAGE PLAIN;  -- the partitions take it, and the key, from here
CREATE TABLE attn_c_attn PARTITION OF weights (chunk DEFAULT 0, matrix DEFAULT 'c_attn') FOR VALUES IN ('c_attn');
CREATE TABLE attn_c_proj PARTITION OF weights (chunk DEFAULT 0, matrix DEFAULT 'attn_c_proj')
    FOR VALUES IN ('attn_c_proj');
CREATE TABLE mlp_c_fc PARTITION OF weights (chunk DEFAULT 0, matrix DEFAULT 'c_fc') FOR VALUES IN ('c_fc');
CREATE TABLE mlp_c_proj PARTITION OF weights (matrix DEFAULT 'mlp_c_proj') FOR VALUES IN ('mlp_c_proj');

ALTER TABLE wte ALTER COLUMN w SET STORAGE PLAIN;
ALTER TABLE wpe ALTER COLUMN w SET STORAGE PLAIN;

-- picoGPT's helpers, same names as runner/reference.py
CREATE FUNCTION gelu(x float8) RETURNS float8
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT 0.5 * x * (1 + tanh(sqrt(2 / pi()) * (x + 0.044715 * x * x * x))) $$;

CREATE FUNCTION layer_norm(x vector, g vector, b vector) RETURNS vector
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT xc * array_fill((1 / sqrt(inner_product(xc, xc) / n + 1e-5))::real, ARRAY[n])::vector * g + b
    FROM (SELECT x - array_fill((inner_product(x, array_fill(1::real, ARRAY[n])::vector) / n)::real,
                                ARRAY[n])::vector AS xc, n
          FROM (SELECT vector_dims(x) AS n) d) c
$$;

-- exp0: exp(x), or 0 where it underflows, as NumPy's exp (PostgreSQL's raises an error there: below about -745).
-- Every softmax takes it of a logit or score less the largest, which at a low temperature is often that far below.
-- Not STRICT: PostgreSQL inlines no STRICT function whose body is a CASE, and a call per logit doubled a decode step
CREATE FUNCTION exp0(x float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT CASE WHEN x < -745 THEN 0 ELSE exp(x) END $$;

-- as_weights: an activation in the weights' type, for inner_product with weight rows. The identity for fp32
-- models; float16.sql replaces it with a cast to halfvec for fp16 ones, so one query serves both.
CREATE FUNCTION as_weights(x vector) RETURNS vector
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT x $$;

-- columns_of: a linear layer's result for several positions is a matrix y[col][position] (2-D real[]); this cuts
-- it back into one vector per column, i.e. per position (unnest reads a slice out in storage order, row-major,
-- so a column's values come in row order)
CREATE FUNCTION columns_of(m real[]) RETURNS vector[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ARRAY(SELECT ARRAY(SELECT unnest(m[:][j:j]))::vector FROM generate_series(1, array_length(m, 2)) AS j
                 ORDER BY j)
$$;

-- vector_cat: vectors end to end, in the aggregate's order (a several-position linear's output from its tiles).
-- PARALLEL SAFE, as vector_concat is, so that a model function may run in a parallel worker (no combine function:
-- it is never split across workers, only run whole in one)
CREATE AGGREGATE vector_cat(vector) (SFUNC = vector_concat, STYPE = vector, PARALLEL = SAFE);

-- head_cache: one attention head's KV cache in the query's recursive state: its keys, one hd-vector per position,
-- and its values transposed, one vector over the positions per column.
CREATE TYPE head_cache AS (k vector[], v vector[]);
-- seq_cache: one sequence's KV cache, its heads' caches in (layer, head) order. The state keeps an array of these,
-- one per sequence, so a step finds a head's cache in place by walking at most the sequences and then n_layer x
-- n_head elements: finding an element of an array of variable-length values walks every element before it, and
-- one flat array over all sequences' heads would make that walk grow with the batch at every one of its heads
-- (an array of head_cache[] is not possible either: it would be one 2-D array)
CREATE TYPE seq_cache AS (heads head_cache[]);
-- seq_state: the unfinished sequences of a batch as the recursion hands them from step to step, one array element
-- per sequence, in order: its number (i, from 1), its positions so far (past), the next step's input tokens of
-- them all one after another (inputs; lens: how many are each one's), the cache it reads (slot: its place in the
-- chunk's cache; sequences may share one, as classify's choices share their text's), and the bytes it has
-- generated (texts, for stop strings)
CREATE TYPE seq_state AS (i int[], past int[], lens int[], inputs int[], slots int[], texts bytea[]);

-- SQL has no RAISE; the query calls this to stop with a message a user can act on.
-- VOLATILE, though it changes nothing: the planner evaluates an IMMUTABLE call with constant arguments while it
-- plans (and a STABLE one while it estimates), which would raise the error from a CASE branch that is never taken.
-- PARALLEL SAFE: an error raised in a parallel worker reaches the leader and the client as it is.
CREATE FUNCTION raise_error(message text) RETURNS int LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = message, ERRCODE = '22023';
END $$;

-- decode: bytes -> text the way Python's bytes.decode('utf-8', errors='replace') does it: each maximal
-- ill-formed part (a stray byte, a character cut short, e.g. at the end of a completion) becomes U+FFFD;
-- so does a NUL byte, which PostgreSQL text cannot hold
CREATE FUNCTION decode_utf8(data bytea) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    WITH RECURSIVE scan(i, part) AS (
        SELECT 0, NULL::text COLLATE "C"
        UNION ALL
        SELECT scan.i + step.n, step.part
        FROM scan, LATERAL (
            SELECT CASE WHEN c.ok = c.need THEN convert_from(substring(data FROM scan.i + 1 FOR c.need + 1), 'UTF8')
                        ELSE U&'\FFFD' END AS part,
                   CASE WHEN c.need < 0 THEN 1 ELSE c.ok + 1 END AS n
            FROM (SELECT l.need, (
                      -- how many of the needed continuation bytes follow (the first has a narrower range
                      -- after E0, ED, F0 and F4: no overlong forms, surrogates or code points past U+10FFFF)
                      SELECT count(*) FROM (
                          SELECT k, bool_and(get_byte(data, scan.i + k) BETWEEN
                                   CASE WHEN k = 1 AND l.lead = 224 THEN 160 WHEN k = 1 AND l.lead = 240 THEN 144
                                        ELSE 128 END
                               AND CASE WHEN k = 1 AND l.lead = 237 THEN 159 WHEN k = 1 AND l.lead = 244 THEN 143
                                        ELSE 191 END) OVER (ORDER BY k) AS ok
                          FROM generate_series(1, least(l.need, length(data) - scan.i - 1)) AS k) cont
                      WHERE cont.ok)::int AS ok
                  FROM (SELECT get_byte(data, scan.i) AS lead,
                               CASE WHEN get_byte(data, scan.i) = 0 THEN -1  -- text cannot hold NUL
                                    WHEN get_byte(data, scan.i) < 128 THEN 0
                                    WHEN get_byte(data, scan.i) BETWEEN 194 AND 223 THEN 1
                                    WHEN get_byte(data, scan.i) BETWEEN 224 AND 239 THEN 2
                                    WHEN get_byte(data, scan.i) BETWEEN 240 AND 244 THEN 3
                                    ELSE -1 END AS need) l) c
        ) step
        WHERE scan.i < length(data)
    )
    SELECT coalesce(string_agg(part, '' ORDER BY i), '') FROM scan WHERE part IS NOT NULL
$$;
