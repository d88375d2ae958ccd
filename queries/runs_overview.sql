-- Every run with its size, status and intervention.
SELECT run_id, model, status, n_items, n_rows, intervention, created_at, completed_at
FROM runs ORDER BY created_at;
