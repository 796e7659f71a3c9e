-- score: each token of gpt.prompt (or of each of gpt.prompts) and its log-probability given the tokens before it,
-- the first given <|endoftext|> (i, pos from 0, token, text, logprob)
\set gpt_score
SET gpt.task = score;
\ir generate.sql
RESET gpt.task;
