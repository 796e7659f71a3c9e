-- embed: each text's embedding (i, embedding: a vector), its residual stream after the last block and ln_f, or
-- after block gpt.layer if set (0 = the first), averaged over its positions. Reads gpt.prompt (or gpt.prompts)
\set gpt_embed
SET gpt.task = embed;
\ir generate.sql
RESET gpt.task;
