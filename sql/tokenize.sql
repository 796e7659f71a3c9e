-- tokenize: gpt.prompt's tokens (pos, token, bytes), from the SQL tokenizer; nothing else is computed
\set gpt_tokenize
SET gpt.task = generate;
\ir generate.sql
RESET gpt.task;
