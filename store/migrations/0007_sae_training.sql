-- Quality of the project's own trained SAEs, one row per SAE (see extract/sae_train.py).
-- "Ordinary" rows: every position except position 0 and rows whose residual norm exceeds
-- massive_ratio x the layer's median norm (the massive activations), on held-out WikiText-2.
CREATE TABLE IF NOT EXISTS sae_quality (
    sae_id VARCHAR PRIMARY KEY,      -- saes.sae_id: "<model>/<settings hash>/layer_<L>"
    model VARCHAR NOT NULL,
    layer SMALLINT NOT NULL,
    architecture VARCHAR NOT NULL,   -- topk | batchtopk | jumprelu
    width INTEGER NOT NULL,          -- latents (d_sae)
    k INTEGER,                       -- TopK / BatchTopK k
    seed INTEGER NOT NULL,
    settings_hash VARCHAR NOT NULL,
    fvu DOUBLE,                      -- fraction of variance unexplained, ordinary held-out rows
    l0 DOUBLE,                       -- mean active latents per ordinary held-out row
    dead_frac DOUBLE,                -- share of latents that fire on no training row
    ce_clean DOUBLE,                 -- next-token CE (nats) on held-out windows, unmodified model
    ce_spliced DOUBLE,               -- ... with the SAE's reconstruction spliced in at ordinary positions
    ce_zero DOUBLE,                  -- ... with those positions zeroed instead
    ce_increase DOUBLE,              -- ce_spliced - ce_clean
    ce_zero_increase DOUBLE,         -- ce_zero - ce_clean
    ce_ratio DOUBLE,                 -- ce_increase / ce_zero_increase (target <= 0.25)
    massive_rel_err DOUBLE,          -- sum |x - x_hat|^2 / sum |x|^2 over held-out massive rows (position 0 etc.)
    n_train_rows INTEGER,
    n_eval_rows INTEGER,
    n_massive_eval_rows INTEGER,
    n_excluded_massive_train_rows INTEGER,  -- training rows excluded for their norm (besides position 0)
    median_norm DOUBLE,              -- median residual norm of the layer's training rows
    steps INTEGER,                   -- optimizer steps
    train_seconds DOUBLE,
    created_at TIMESTAMP NOT NULL
);
