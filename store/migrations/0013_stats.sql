-- Issue 15 (uncertainty): Wilson 95% intervals stored beside rates, paired tests where two conditions are
-- judged on the same prompts, and the CE difference to the baseline with a paired bootstrap interval.
-- New kinds, no new columns: set_checks.kind 'random_magnitude' (random active features drawn from the same
-- activation-value quantiles as the set's), control_results / control_asr kind 'obrien_size' (per prompt the
-- O'Brien et al. features ranked by token count, cut to the stage-2 set's size; k = 0) and 'random_magnitude';
-- stage3_outcomes / stage3_asr ranker 'stage3_alone' (each prompt's stage-3 set ablated without stage 2).

-- Two conditions judged on the same prompts: the 2x2 table of jailbroken flags, McNemar's exact test and the
-- difference in ASR with Newcombe's paired 95% interval (analyze/metrics.py::Paired).
CREATE TABLE IF NOT EXISTS paired_tests (
    analysis_id VARCHAR NOT NULL,    -- = analyses.analysis_id (prune, controls or stage3)
    a VARCHAR NOT NULL,              -- condition A, e.g. stage2, fm
    b VARCHAR NOT NULL,              -- condition B, e.g. random, random_magnitude, obrien_size, probe
    k INTEGER NOT NULL,              -- stage 3: the K both rankers ablate; 0 elsewhere
    n_pairs INTEGER NOT NULL,        -- prompts judged under both
    n_both INTEGER NOT NULL,         -- jailbroken under both
    n_a_only INTEGER NOT NULL,       -- jailbroken under A only (McNemar's b)
    n_b_only INTEGER NOT NULL,       -- jailbroken under B only (McNemar's c)
    n_neither INTEGER NOT NULL,      -- jailbroken under neither
    p_value DOUBLE NOT NULL,         -- two-sided exact McNemar p (1 when there is no discordant pair)
    diff DOUBLE,                     -- ASR(A) - ASR(B) over the pairs
    diff_low DOUBLE,                 -- Newcombe's (1998, method 10) paired 95% interval of diff
    diff_high DOUBLE,                -- its upper end
    PRIMARY KEY (analysis_id, a, b, k)
);

ALTER TABLE control_asr ADD COLUMN IF NOT EXISTS ci_low DOUBLE;    -- Wilson 95% interval of asr (n_jailbroken / n_prompts)
ALTER TABLE control_asr ADD COLUMN IF NOT EXISTS ci_high DOUBLE;   -- its upper end
ALTER TABLE stage3_asr ADD COLUMN IF NOT EXISTS ci_low DOUBLE;     -- Wilson 95% interval of asr
ALTER TABLE stage3_asr ADD COLUMN IF NOT EXISTS ci_high DOUBLE;    -- its upper end
ALTER TABLE costs ADD COLUMN IF NOT EXISTS over_refusal_ci_low DOUBLE;   -- Wilson 95% interval of over_refusal (pooled prompts)
ALTER TABLE costs ADD COLUMN IF NOT EXISTS over_refusal_ci_high DOUBLE;  -- its upper end
ALTER TABLE costs ADD COLUMN IF NOT EXISTS ce_alpaca_diff DOUBLE;        -- ce_alpaca minus the baseline's on the same prompts (mean over sets)
ALTER TABLE costs ADD COLUMN IF NOT EXISTS ce_alpaca_diff_low DOUBLE;    -- paired percentile-bootstrap 95% interval (prompts resampled)
ALTER TABLE costs ADD COLUMN IF NOT EXISTS ce_alpaca_diff_high DOUBLE;   -- its upper end
ALTER TABLE costs ADD COLUMN IF NOT EXISTS ce_text_diff DOUBLE;          -- ce_text minus the baseline's on the same windows
ALTER TABLE costs ADD COLUMN IF NOT EXISTS ce_text_diff_low DOUBLE;      -- paired percentile-bootstrap 95% interval (windows resampled)
ALTER TABLE costs ADD COLUMN IF NOT EXISTS ce_text_diff_high DOUBLE;     -- its upper end
