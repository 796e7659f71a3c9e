-- text: each prompt's completion as one value (i, completion). Reads what generate.sql reads: gpt.prompt (or
-- gpt.prompts), gpt.tokens, gpt.temperature, gpt.top_n, gpt.top_p, gpt.seed (or gpt.seeds), gpt.stop
\set gpt_text
SET gpt.task = generate;
\ir generate.sql
RESET gpt.task;
