-- gpt-sql: the linear, which reads the weights table (schema.sql), and how many of its rows a tile holds (run after
-- schema.sql and float16.sql).

-- tile_rows: how many weight rows like `row` one tile of the several-position linear holds: 256 KB of them. A
-- tile's array, and the blocks array_agg builds it in, stay under the server's malloc mmap threshold (512 KB,
-- runner/db.py), so step after step they reuse the backend's heap; a whole matrix's array (2-9 MB a layer) was
-- mapped afresh at every layer of every step and its pages faulted in, about 0.5 s a step for 124M
CREATE FUNCTION tile_rows("row" anyelement) RETURNS int
    LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$ SELECT greatest(1, 262144 / pg_column_size("row")) $$;

-- linear: hs @ w + b for a matrix's rows (layer l, chunk c), one output vector per position of hs (in the
-- weights' type: as_weights), with gelu of each output when act = 'gelu'. Inlined where it is called (a
-- set-returning SQL function, not volatile, called in FROM), so the matrix's name is a constant to the planner.
-- Two forms:
-- - one position (a decode step of one sequence): one ordered scan of the layer's rows, the position's product
--   with each row while it is at hand, in column order: its output vector. The position's vector is taken out of
--   its array once (one: OFFSET 0 keeps it a value), not at every row (0.05 us a row);
-- - several positions: tile by tile (tile_rows consecutive columns, read by one ordered range scan and copied into
--   arrays; array_agg takes its rows in the order the subquery gives them), each position's pass of products along
--   the tile gives its piece of the output, and each position's pieces, end to end in column order, are its output
--   vector (vector_cat). A scan with every position's product per row would give a matrix y[col][pos] to cut into
--   the positions' vectors, which costs as much again as the products. The bias is added as a vector, rounded
--   once as the single form rounds (fp32(dot) + b is exact in float8), so both give the same bits.
-- gelu is taken of each output as it is made, in float8 before it is rounded to fp32, so the bias goes with each
-- product there: the several-position form reads (weights, bias) pairs by a scan of unnest that each position
-- rewinds (a scan that copies its tile, which is why a tile is small); OFFSET 0 keeps each product a value of its
-- own (gelu, inlined, reads its argument 4 times).
-- PARALLEL SAFE: it only reads the weights, so a model function may run it in a parallel worker.
CREATE FUNCTION linear(hs anyarray, m text, l int, c int, act text DEFAULT NULL) RETURNS TABLE (ys vector[])
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN cardinality(hs) = 1 AND act = 'gelu'
           THEN ARRAY[ARRAY(SELECT gelu(y.y)
                            FROM (SELECT inner_product(one.h, w.w) + w.b AS y, w.col
                                  FROM weights w WHERE w.matrix = m AND w.layer = l AND w.chunk = c
                                  ORDER BY w.col OFFSET 0) y
                            ORDER BY y.col)::vector]
           WHEN cardinality(hs) = 1
           THEN ARRAY[ARRAY(SELECT inner_product(one.h, w.w) + w.b
                            FROM weights w WHERE w.matrix = m AND w.layer = l AND w.chunk = c
                            ORDER BY w.col)::vector]
           ELSE ARRAY(SELECT vector_cat(piece.y ORDER BY tile.first)
                      FROM (SELECT t.first,
                                   ARRAY(SELECT CASE WHEN act = 'gelu'
                                                THEN ARRAY(SELECT gelu(y.y)
                                                           FROM (SELECT inner_product(x, u.w) + u.b AS y
                                                                 FROM unnest(w.ws, w.bs) AS u(w, b) OFFSET 0) y)::vector
                                                ELSE ARRAY(SELECT inner_product(x, unnest(w.ws)))::vector + w.bv END
                                         FROM unnest(hs) AS x) AS pieces
                            FROM generate_series(0, (SELECT max(w.col) FROM weights w
                                                     WHERE w.matrix = m AND w.layer = l AND w.chunk = c),
                                                 tile_rows(one.h)) AS t(first),
                                 LATERAL (SELECT array_agg(w.w) AS ws, array_agg(w.b) AS bs, array_agg(w.b)::vector AS bv
                                          FROM (SELECT w.w, w.b FROM weights w
                                                WHERE w.matrix = m AND w.layer = l AND w.chunk = c
                                                      AND w.col >= t.first AND w.col < t.first + tile_rows(one.h)
                                                ORDER BY w.col) w) w
                            OFFSET 0) tile,
                           unnest(tile.pieces) WITH ORDINALITY AS piece(y, p)
                      GROUP BY piece.p ORDER BY piece.p)
           END
    FROM (SELECT hs[1] AS h OFFSET 0) one
$$;
