-- inspect: what the model saw in gpt.prompt, rows by kind (kind, layer, head, pos, token, prob, weights): 'token'
-- the prompt's tokens, 'attention' each head's attention weights at each position, 'lens' the logit lens (the
-- likeliest token after each block at each position, and its probability)
\set gpt_inspect
SET gpt.task = inspect;
\ir generate.sql
RESET gpt.task;
