-- What an intervention costs (cross-entropy, over-refusal), and feature explanations.

-- Per-item cross-entropy, filled by extractions with ExtractSettings(loss=True) (NULL otherwise).
ALTER TABLE items ADD COLUMN IF NOT EXISTS ce_loss FLOAT;       -- mean next-token CE (nats) over the item's user-role tokens
ALTER TABLE items ADD COLUMN IF NOT EXISTS n_loss_tokens INTEGER; -- how many tokens that mean is over

-- The paper's Table 9 plus over-refusal: one row per (analysis, condition), and for feature
-- ablation one more row per per-prompt feature set (set_prompt_id not NULL).
CREATE TABLE IF NOT EXISTS costs (
    costs_id VARCHAR NOT NULL,       -- sha256 of model, settings, direction and feature sets [:16]
    model VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,      -- baseline | direction_ablation | feature_ablation
    set_prompt_id VARCHAR,           -- feature ablation: the prompt whose set this row ablates; NULL on the condition's row
    n_sets INTEGER,                  -- feature sets averaged on the condition's row (1 on a per-set row)
    n_features DOUBLE,               -- features ablated (mean over sets)
    ce_alpaca DOUBLE,                -- token-weighted mean CE (nats), Alpaca instruction tokens in the chat template
    ce_alpaca_std DOUBLE,            -- std over feature sets (condition row of feature ablation), else NULL
    n_alpaca INTEGER,                -- prompts
    n_alpaca_tokens INTEGER,         -- scored tokens (per set)
    ce_text DOUBLE,                  -- token-weighted mean CE (nats), WikiText-2 eval windows, raw text
    ce_text_std DOUBLE,
    n_text INTEGER,
    n_text_tokens INTEGER,
    over_refusal DOUBLE,             -- share of XSTest safe prompts judged refusal
    over_refusal_std DOUBLE,         -- std over feature sets (each set judged on its share of the prompts)
    n_xstest INTEGER,
    judge VARCHAR,                   -- judge id of the over-refusal verdicts (rows in judgements)
    alpaca_run_id VARCHAR,           -- the extraction runs the numbers come from (items.ce_loss, completions)
    text_run_id VARCHAR,
    xstest_run_id VARCHAR,
    settings JSON NOT NULL,          -- CostsSettings as JSON (round-trips exactly)
    created_at TIMESTAMP NOT NULL,
    code_version VARCHAR NOT NULL
);

-- Human or model-written explanations of SAE latents, imported from a file (e.g. a Neuronpedia export).
CREATE TABLE IF NOT EXISTS feature_explanations (
    layer SMALLINT NOT NULL,
    feature INTEGER NOT NULL,
    explanation VARCHAR NOT NULL,
    source VARCHAR NOT NULL,         -- the file it was imported from
    imported_at TIMESTAMP NOT NULL,
    PRIMARY KEY (layer, feature)
);
