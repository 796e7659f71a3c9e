-- gpt-sql: a model with fp16 weights (gpt-sql load --dtype float16). Run after schema.sql, before the COPY:
-- the embeddings and matrices become pgvector halfvec (2 bytes a weight, 5 rows of 768 to an 8 KB page instead
-- of 2); layer norms and biases stay fp32. Activations meet the weights as halfvec (rounded to nearest), and
-- pgvector takes the inner product in fp32; runner/reference.py rounds at the same places.
-- (a new type brings back its default storage: keep the rows inline, as out-of-line rows cost 3 buffer reads each)
ALTER TABLE wte ALTER COLUMN w TYPE halfvec, ALTER COLUMN w SET STORAGE PLAIN;
ALTER TABLE wpe ALTER COLUMN w TYPE halfvec, ALTER COLUMN w SET STORAGE PLAIN;
ALTER TABLE weights ALTER COLUMN w TYPE halfvec, ALTER COLUMN w SET STORAGE PLAIN;  -- and its partitions'

DROP FUNCTION as_weights(vector);
CREATE FUNCTION as_weights(x vector) RETURNS halfvec
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT x::halfvec $$;
