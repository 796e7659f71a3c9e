-- perplexity: each text's perplexity (i, perplexity), exp of the mean negative log-probability of its tokens as
-- sql/score.sql gives them. Reads gpt.prompt (or gpt.prompts)
\set gpt_perplexity
SET gpt.task = score;
\ir generate.sql
RESET gpt.task;
