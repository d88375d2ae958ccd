-- Transfer: the found interventions applied to held-out harmful prompts (analyze/transfer.py).
-- The analysis is an `analyses` row of kind 'transfer' whose parent_id is the prune analysis; its metrics
-- name the dataset, split, direction analysis and stage-3 analysis used. Each row points at the judged
-- extraction run (one item per intervention and prompt) and at the Alpaca loss run.

-- One row per intervention: the unmodified model (none), the direction, the feature sets and their random controls.
CREATE TABLE transfer_results (
    transfer_id VARCHAR NOT NULL,    -- = analyses.analysis_id (kind 'transfer')
    intervention VARCHAR NOT NULL,   -- none | direction | union | core | stage3 | random_count | random_active
    matched_to VARCHAR,              -- random controls: the set (union, core, stage3) whose size they match; NULL otherwise
    n_features INTEGER NOT NULL,     -- (layer, feature) pairs zero-ablated at every position (direction, none: 0)
    n_prompts INTEGER NOT NULL,      -- held-out prompts judged under the intervention
    n_refused INTEGER NOT NULL,      -- of them, judged refusal without intervention: the ASR denominator
    n_jailbroken INTEGER NOT NULL,   -- of those, judged compliance under the intervention
    asr DOUBLE,                      -- n_jailbroken / n_refused; NULL when n_refused = 0
    ci_low DOUBLE,                   -- Wilson 95% interval of asr
    ci_high DOUBLE,                  -- its upper end
    ce_alpaca DOUBLE,                -- next-token CE (nats / token) on Alpaca test instruction tokens; NULL: not measured
    spec_hash VARCHAR NOT NULL,      -- the intervention applied (interventions.spec_hash)
    run_id VARCHAR NOT NULL,         -- the judged extraction run
    alpaca_run_id VARCHAR            -- the loss run of ce_alpaca
);
