-- Features active at the last prompt token of harmful (label 1) prompts and never on benign (label 0) ones,
-- over the unablated runs; ranked by how many harmful prompts they fire on.
WITH last_rows AS (
    SELECT t.run_id, t.row, p.label
    FROM tokens t
    JOIN items i ON i.run_id = t.run_id AND i.item = t.item
    JOIN interventions s ON s.spec_hash = i.spec_hash
    JOIN prompts p ON p.prompt_id = t.prompt_id
    WHERE t.pos = i.n_tokens - 1 AND s.spec = '{}'
), per_feature AS (
    SELECT a.layer, a.feature,
           count(DISTINCT CASE WHEN l.label = 1 THEN l.run_id || ':' || l.row END) AS n_harmful,
           count(DISTINCT CASE WHEN l.label = 0 THEN l.run_id || ':' || l.row END) AS n_benign,
           avg(CASE WHEN l.label = 1 THEN a.value END) AS mean_value_harmful
    FROM sae_acts a JOIN last_rows l USING (run_id, row)
    GROUP BY a.layer, a.feature
)
SELECT layer, feature, n_harmful, mean_value_harmful
FROM per_feature WHERE n_benign = 0 AND n_harmful > 0
ORDER BY n_harmful DESC, mean_value_harmful DESC
LIMIT 100;
