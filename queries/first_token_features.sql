-- Features that fire on the first token (BOS / <|im_start|>) of prompts, per layer, in complete runs.
SELECT a.layer, a.feature, count(*) AS n_prompts, avg(a.value) AS mean_value, max(a.value) AS max_value
FROM sae_acts a
JOIN tokens t USING (run_id, row)
WHERE t.role = 'first'
GROUP BY a.layer, a.feature
ORDER BY a.layer, n_prompts DESC, mean_value DESC;
