-- classify: each choice's probability after a text (choice from 0, text, prob), normalised over the choices.
-- Reads gpt.prompts: the text, then the choices, e.g. SET gpt.prompts = '{"The movie was", " great", " awful"}'
\set gpt_classify
SET gpt.task = classify;
\ir generate.sql
RESET gpt.task;
