-- The 10 most frequently active features of each layer (share of stored token rows they fire on).
WITH counts AS (
    SELECT layer, feature, count(*) AS n_active, avg(value) AS mean_value
    FROM sae_acts GROUP BY layer, feature
), rows_per_layer AS (
    SELECT l.layer, sum(r.n_rows) AS n_rows
    FROM layers l JOIN runs r USING (run_id) WHERE l.sae_id IS NOT NULL GROUP BY l.layer
), ranked AS (
    SELECT c.*, c.n_active / p.n_rows AS density,
           row_number() OVER (PARTITION BY c.layer ORDER BY c.n_active DESC, c.feature) AS rank
    FROM counts c JOIN rows_per_layer p USING (layer)
)
SELECT layer, rank, feature, n_active, density, mean_value FROM ranked WHERE rank <= 10 ORDER BY layer, rank;
