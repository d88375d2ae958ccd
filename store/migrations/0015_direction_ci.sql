-- Issue 15 (uncertainty): the directional-ablation ASR of each evaluated layer with its Wilson 95% interval
-- (n_jailbroken = asr x n_refused). Rows saved before this migration keep NULL.
ALTER TABLE directions ADD COLUMN IF NOT EXISTS asr_ci_low DOUBLE;    -- Wilson 95% interval of asr
ALTER TABLE directions ADD COLUMN IF NOT EXISTS asr_ci_high DOUBLE;   -- its upper end
