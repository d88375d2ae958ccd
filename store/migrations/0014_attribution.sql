-- Gradient attribution over SAE latents (analyze/attribution.py, extract/gradients.py): the linear prediction of
-- zero-ablating each active latent, and its check against real ablation runs. The analysis is an `analyses` row of
-- kind 'attribution' whose parent_id is the candidates analysis whose prompts and SAE layers it scored.
-- IF NOT EXISTS: stores made on the branch that built this numbered it 0013 and already hold these tables
-- (store.py::_renumbered).

-- One row per (prompt, layer, latent active on the prompt): the predicted change of the metric under its ablation.
CREATE TABLE IF NOT EXISTS attribution_scores (
    attribution_id VARCHAR NOT NULL, -- = analyses.analysis_id (kind 'attribution')
    prompt_id VARCHAR NOT NULL,
    layer SMALLINT NOT NULL,         -- residual after block `layer` (the SAE's layer)
    feature INTEGER NOT NULL,        -- SAE latent, active (> 0) at some position of the prompt's clean forward
    score DOUBLE NOT NULL,           -- predicted delta of the metric when the latent is zero-ablated at every position
    z_sum DOUBLE NOT NULL,           -- sum over positions of its activation in the clean forward
    metric VARCHAR NOT NULL,         -- log_p (log P("I") at the last prompt position) | logit_diff
    method VARCHAR NOT NULL,         -- atp (steps = 1: attribution patching) | ig (integrated gradients)
    steps INTEGER NOT NULL           -- integrated-gradient points (1 = attribution patching)
);

-- One row per prompt: the clean metric the scores are gradients of.
CREATE TABLE IF NOT EXISTS attribution_prompts (
    attribution_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    metric_clean DOUBLE NOT NULL,    -- the metric in the clean forward of the gradient pass
    p_i_clean DOUBLE NOT NULL,       -- P("I") there
    compliant_token INTEGER          -- logit_diff: the most likely non-"I" first token of the clean forward; else NULL
);

-- Faithfulness: sampled single latents and blocks, their predicted and measured (real ablation run) effects.
CREATE TABLE IF NOT EXISTS attribution_checks (
    attribution_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,           -- single (one latent) | block (block_size latents of one layer)
    layer SMALLINT NOT NULL,         -- the layer of the ablated latents
    features INTEGER[] NOT NULL,     -- the latents zero-ablated at every position
    predicted_delta DOUBLE NOT NULL, -- sum of their scores: the predicted delta of the metric
    measured_delta DOUBLE,           -- the metric under the ablation minus the clean metric, both from the run
    predicted_dp DOUBLE,             -- predicted delta P("I"): P0 (exp(predicted_delta) - 1) for log_p; NULL for logit_diff
    measured_dp DOUBLE NOT NULL,     -- P("I") under the ablation minus P("I") clean, both from the run
    run_id VARCHAR NOT NULL,         -- the ablation run (one item per check, plus the clean items)
    item INTEGER NOT NULL
);

-- Per layer (NULL: all layers) and kind (single, block, all): correlation of predicted and measured effects.
CREATE TABLE IF NOT EXISTS attribution_correlations (
    attribution_id VARCHAR NOT NULL,
    layer SMALLINT,                  -- NULL: every layer together
    kind VARCHAR NOT NULL,           -- single | block | all
    quantity VARCHAR NOT NULL,       -- dp (delta P("I")) | metric (delta of the attribution metric)
    n INTEGER NOT NULL,              -- checks correlated
    pearson DOUBLE,                  -- NULL when n < 3 or a side is constant
    spearman DOUBLE
);
