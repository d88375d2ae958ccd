-- Mean P("I") at the last prompt position per run and dataset (the paper's refusal signal).
SELECT i.run_id, p.dataset, count(*) AS n_prompts, avg(i.p_i) AS mean_p_i, avg(i.refusal_score) AS mean_refusal_score
FROM items i JOIN prompts p USING (prompt_id)
GROUP BY i.run_id, p.dataset ORDER BY i.run_id, p.dataset;
