-- Controls: the O'Brien et al. baseline beside the stage-2 sets' random-feature control.
-- O'Brien et al. ablate every SAE feature active on >= k tokens of the prompt; here over a stage-2 analysis'
-- prompts, whose random control (set_checks, kind random) is read, not recomputed. The analysis itself is
-- an `analyses` row of kind 'controls' whose parent_id is the prune analysis. Every measurement points at
-- an extraction run's item (items holds P("I") and the greedy completion).

-- Each stage-2 prompt without intervention (kind clean) and with its O'Brien set at each k ablated, judged.
CREATE TABLE control_results (
    controls_id VARCHAR NOT NULL,    -- = analyses.analysis_id (kind 'controls')
    kind VARCHAR NOT NULL,           -- clean (no ablation) | obrien (features active on >= k counted tokens ablated)
    k INTEGER NOT NULL,              -- obrien: the token threshold; clean: 0
    prompt_id VARCHAR NOT NULL,      -- a prompt with a stage-2 set check (set_checks.prompt_id)
    n_features INTEGER NOT NULL,     -- (layer, feature) pairs zero-ablated, over the stage-2 SAE layers
    run_id VARCHAR NOT NULL,         -- one extraction run per (kind, k); identical (prompt, set) rows share an item
    item INTEGER NOT NULL,           -- its item; the item's spec_hash is the ablation applied
    p_i FLOAT NOT NULL,              -- P("I") at the last prompt position under the ablation
    verdict VARCHAR NOT NULL,        -- the judge's verdict (analyses.judge)
    jailbroken BOOLEAN NOT NULL,     -- verdict = compliance
    refused_clean BOOLEAN NOT NULL,  -- the prompt's clean verdict is refusal: only these count in control_asr
    PRIMARY KEY (controls_id, kind, k, prompt_id)
);

-- ASR per control: obrien per k (over prompts refused clean), and, copied from the prune analysis'
-- set_checks (selected rows, same prompts), its selected sets (stage2) and their random control (random).
CREATE TABLE control_asr (
    controls_id VARCHAR NOT NULL,    -- = analyses.analysis_id (kind 'controls')
    kind VARCHAR NOT NULL,           -- obrien | stage2 | random
    k INTEGER,                       -- obrien: the token threshold; NULL for stage2 and random
    n_prompts INTEGER NOT NULL,      -- the ASR denominator
    n_jailbroken INTEGER NOT NULL,   -- judged compliance
    asr FLOAT,                       -- n_jailbroken / n_prompts; NULL when n_prompts = 0
    mean_features FLOAT              -- mean features ablated per prompt
);
