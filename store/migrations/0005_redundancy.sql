-- Redundancy: dormant "hydra" features of the stage-2 sets, clamping, stage-2/stage-3 links.
-- A feature is the pair (layer, feature). Every measurement points at an extraction run's item
-- (items holds P("I") and the greedy completion; tokens and sae_acts hold the activations).
-- A prompt's "clean run" is an extraction with the empty intervention at every token position.

-- One redundancy analysis: which sets it read, with which SAEs, judge and settings.
CREATE TABLE redundancy_analyses (
    analysis_id VARCHAR PRIMARY KEY, -- sha256 of model, prune_id, stage3_id, SAE sources and settings [:16]
    model VARCHAR NOT NULL,
    prune_id VARCHAR NOT NULL,       -- feature_sets.set_id of the stage-2 sets (stage = 2, selected)
    stage3_id VARCHAR,               -- feature_sets.set_id of the stage-3 sets; NULL: item 5 not run
    judge VARCHAR NOT NULL,          -- how "jailbroken" was decided (see analyze/redundancy.py)
    sae_set JSON NOT NULL,           -- {layer: SAE source} used by every run below
    settings JSON NOT NULL,          -- RedundancySettings as JSON (round-trips exactly)
    clean_run_id VARCHAR NOT NULL,   -- the stage-2 prompts without intervention, every position
    ablation_run_id VARCHAR,         -- set / inactive / active ablations (items: redundancy_ablations)
    stage3_run_id VARCHAR,           -- stage-3-only ablations
    clamp_run_id VARCHAR,            -- clamped benign prompts
    metrics JSON NOT NULL,           -- the summary numbers the command prints
    created_at TIMESTAMP NOT NULL,
    code_version VARCHAR NOT NULL
);

-- Item 1: every feature of every prompt's selected stage-2 set, read from the clean run.
-- Inactive = no sae_acts row (z <= the run's threshold, 0.0) at ANY stored position of the prompt.
CREATE TABLE redundancy_features (
    analysis_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    layer SMALLINT NOT NULL,
    feature INTEGER NOT NULL,
    n_active_pos INTEGER NOT NULL,   -- prompt positions where it fires in the clean run
    max_value FLOAT NOT NULL,        -- its largest activation there (0 when inactive)
    sum_value FLOAT NOT NULL,        -- its activations summed over the prompt's positions
    first_value FLOAT NOT NULL,      -- its activation on the first token (role 'first', position 0)
    inactive BOOLEAN NOT NULL,       -- n_active_pos = 0: a dormant feature of the set
    PRIMARY KEY (analysis_id, prompt_id, layer, feature)
);

-- Items 2 and 5: each prompt under each ablation, judged.
-- kind: clean (no ablation) | set (the whole stage-2 set) | inactive (its dormant features only)
--       | active (the set without its dormant features) | stage3 (the prompt's stage-3 set only)
CREATE TABLE redundancy_ablations (
    analysis_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    n_features INTEGER NOT NULL,     -- features zero-ablated (0: the clean run's item)
    run_id VARCHAR NOT NULL,
    item INTEGER NOT NULL,
    p_i FLOAT,
    verdict VARCHAR NOT NULL,        -- refusal | compliance | evasive
    jailbroken BOOLEAN NOT NULL,     -- verdict = compliance
    PRIMARY KEY (analysis_id, prompt_id, kind)
);

-- Item 2's outcome per prompt.
CREATE TABLE redundancy_prompts (
    analysis_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    n_set INTEGER NOT NULL,
    n_active INTEGER NOT NULL,
    n_inactive INTEGER NOT NULL,
    kept BOOLEAN NOT NULL,           -- the set jailbreaks, the set without its dormant features does not
    PRIMARY KEY (analysis_id, prompt_id)
);

-- Item 3: dormant set features that fire once the active part of the set is ablated; one row per
-- (feature, position) where z > 0 in the `active` ablation item (z was 0 there in the clean run).
CREATE TABLE redundancy_switch_on (
    analysis_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    layer SMALLINT NOT NULL,
    feature INTEGER NOT NULL,
    run_id VARCHAR NOT NULL,         -- the ablation run; `row` is its tokens/sae_acts row
    item INTEGER NOT NULL,
    row INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    token_text VARCHAR NOT NULL,
    role VARCHAR NOT NULL,           -- first | template | user | post_instruction
    value FLOAT NOT NULL,            -- its activation under the ablation (clean: 0)
    upstream BOOLEAN NOT NULL,       -- an ablated feature sits at a lower layer: the change came through the model
    same_layer BOOLEAN NOT NULL      -- an ablated feature sits at this layer: the SAE also re-reads its own edit
);

-- Item 4: greedy generations of benign prompts with the switched-on features clamped on the
-- first token (paper Tables 5/6); value NULL is the unclamped baseline.
CREATE TABLE redundancy_clamping (
    analysis_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    text VARCHAR NOT NULL,
    value FLOAT,                     -- every clamped feature is set to this value at the clamp positions
    n_features INTEGER NOT NULL,
    run_id VARCHAR NOT NULL,
    item INTEGER NOT NULL,
    p_i FLOAT,
    completion VARCHAR
);

-- Item 5: each active stage-2 feature under the prompt's stage-3-only ablation (sums over the
-- prompt's positions; first_* on the first token alone, so position 0 can be taken out).
CREATE TABLE redundancy_links (
    analysis_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    layer SMALLINT NOT NULL,
    feature INTEGER NOT NULL,
    clean_sum FLOAT NOT NULL,
    ablated_sum FLOAT NOT NULL,
    clean_first FLOAT NOT NULL,
    ablated_first FLOAT NOT NULL,
    deactivated BOOLEAN NOT NULL,    -- ablated_sum = 0: zero at every position
    activation_drop FLOAT NOT NULL,  -- 1 - ablated_sum / clean_sum (negative: it grew)
    upstream BOOLEAN NOT NULL,       -- a stage-3 feature sits at a lower layer
    same_layer BOOLEAN NOT NULL,     -- a stage-3 feature sits at this layer (SAE re-reads the edit)
    PRIMARY KEY (analysis_id, prompt_id, layer, feature)
);
