-- next: the gpt.top_n likeliest next tokens after gpt.prompt, most likely first (token, text, bytes, prob: softmax
-- of logits / gpt.temperature). It runs one step: gpt.tokens is 1 meanwhile, then what it was
SELECT coalesce(current_setting('gpt.tokens', true), '') AS gpt_tokens \gset
SET gpt.tokens = 1;
\set gpt_next
SET gpt.task = generate;
\ir generate.sql
RESET gpt.task;
SELECT set_config('gpt.tokens', :'gpt_tokens', false) AS gpt_tokens \gset
\unset gpt_tokens
