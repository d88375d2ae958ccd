-- Density of every SAE feature: the share of stored token rows it fires on, over the unablated items
-- of the runs that encoded its layer (rows of runs without activations at that layer do not count),
-- with the prompts and datasets it fires on.
WITH clean_rows AS (
    SELECT t.run_id, t.row, t.prompt_id
    FROM tokens t
    JOIN items i ON i.run_id = t.run_id AND i.item = t.item
    JOIN interventions s ON s.spec_hash = i.spec_hash
    WHERE s.spec = '{}'
), rows_per_layer AS (
    SELECT l.layer, count(*) AS n_rows
    FROM clean_rows c JOIN layers l ON l.run_id = c.run_id AND l.sae_id IS NOT NULL
    GROUP BY l.layer
), active AS (
    SELECT a.layer, a.feature, count(*) AS n_active, count(DISTINCT c.prompt_id) AS n_prompts,
           max(a.value) AS max_value, avg(a.value) AS mean_value
    FROM sae_acts a JOIN clean_rows c ON c.run_id = a.run_id AND c.row = a.row
    GROUP BY a.layer, a.feature
)
SELECT a.layer, a.feature, a.n_active, r.n_rows, a.n_active / r.n_rows AS density,
       a.n_prompts, a.max_value, a.mean_value
FROM active a JOIN rows_per_layer r USING (layer)
ORDER BY a.layer, a.feature;
