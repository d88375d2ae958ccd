-- Stages 1 and 2: refusal direction, judges, candidate sets, pruning (Algorithm 1).
-- A feature is always the pair (layer, feature). Every number here was measured through
-- extraction runs, so (run_id, item) points at the items row that holds P("I") and the completion.

-- One analysis (direction, candidates or prune): what it read and with which settings.
CREATE TABLE analyses (
    analysis_id VARCHAR PRIMARY KEY, -- sha256 of kind, model, parent and settings [:16]
    kind VARCHAR NOT NULL,           -- direction | candidates | prune
    model VARCHAR NOT NULL,
    parent_id VARCHAR,               -- candidates: its direction_id; prune: its candidates_id
    judge VARCHAR NOT NULL,          -- judge id that decided refused / jailbroken (see judgements.judge)
    settings JSON NOT NULL,          -- the stage's settings dataclass as JSON (round-trips exactly)
    metrics JSON,                    -- summary numbers: controls, timings, run ids
    created_at TIMESTAMP NOT NULL,
    code_version VARCHAR NOT NULL
);

-- A judge's verdict on one item of one run (a greedy completion, or P("I") for the p_i judge).
CREATE TABLE judgements (
    run_id VARCHAR NOT NULL,
    item INTEGER NOT NULL,
    judge VARCHAR NOT NULL,          -- name:hash of its phrase lists and parameters, e.g. content:1f2e3d4c
    prompt_id VARCHAR NOT NULL,
    verdict VARCHAR NOT NULL,        -- refusal | compliance | evasive; ASR counts compliance only
    score FLOAT,                     -- content judge: share of the request's content words taken up; p_i judge: P("I")
    completion VARCHAR,              -- the judged text; NULL for a judge that reads P("I") only
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, item, judge)
);

-- Difference-in-means refusal directions, one row per layer, and their directional-ablation scores.
CREATE TABLE directions (
    direction_id VARCHAR NOT NULL,   -- = analyses.analysis_id of the direction analysis
    layer SMALLINT NOT NULL,         -- residual after block `layer`
    vector FLOAT[] NOT NULL,         -- unit mean(harmful) - mean(harmless), last-token residuals, train split
    raw_norm FLOAT NOT NULL,         -- its norm before normalizing: the default direction_add scale
    evaluated BOOLEAN NOT NULL,      -- a candidate layer for l* (the columns below are NULL otherwise)
    n_refused INTEGER,               -- val harmful prompts refused without intervention: the ASR denominator
    asr FLOAT,                       -- share of them judged compliance under ablation of this vector at every layer
    asr_phrase FLOAT,                -- share with no refusal phrase: what a phrase-only judge would call jailbroken
    mean_p_i FLOAT,                  -- mean P("I") of those prompts under the ablation
    kl_harmless FLOAT,               -- mean KL(clean || ablated) of the first reply token, val harmless prompts
    cos_harmful FLOAT,               -- mean cos(val harmful last-token residual at `layer`, r at l*)
    cos_harmful_std FLOAT,
    cos_benign FLOAT,                -- the same for val harmless prompts
    cos_benign_std FLOAT,
    selected BOOLEAN NOT NULL,       -- TRUE at l*: highest ASR, then lowest mean P("I"), then lowest KL
    PRIMARY KEY (direction_id, layer)
);

-- Stage 1: each (prompt, K) evaluated; C_K = top-K latents per candidate layer by cos(r, W_dec[i]).
CREATE TABLE candidate_sets (
    candidates_id VARCHAR NOT NULL,  -- = analyses.analysis_id
    prompt_id VARCHAR NOT NULL,
    k INTEGER NOT NULL,              -- latents per layer; 0 = no ablation (the prompt's clean run)
    n_features INTEGER NOT NULL,     -- |C_K| over all candidate layers
    run_id VARCHAR NOT NULL,         -- extraction run and item where it was measured
    item INTEGER NOT NULL,
    p_i FLOAT NOT NULL,              -- P("I") at the last prompt position under the ablation
    verdict VARCHAR NOT NULL,        -- the analysis judge's verdict
    jailbroken BOOLEAN NOT NULL,     -- verdict = compliance
    chosen BOOLEAN NOT NULL,         -- the smallest K that jailbreaks this prompt: its stage-2 pool
    PRIMARY KEY (candidates_id, prompt_id, k)
);

-- Stage 2: one row per block decision of Algorithm 1, per (prompt, tau, seed) run.
-- K = features pruned so far, V = this block; C\K is ablated before the step.
-- delta = |P(C\K) - P(C\(K u V))| / P(C\K); keep V (it stays ablated) if delta >= tau, else prune it (K <- K u V).
CREATE TABLE pruning_steps (
    prune_id VARCHAR NOT NULL,       -- = analyses.analysis_id
    prompt_id VARCHAR NOT NULL,
    tau FLOAT NOT NULL,
    seed INTEGER NOT NULL,           -- seed of the pool's shuffled order
    step INTEGER NOT NULL,           -- block index in that order, 0-based
    block_layers SMALLINT[] NOT NULL,    -- V as parallel lists (layer, feature)
    block_features INTEGER[] NOT NULL,
    p_base FLOAT NOT NULL,           -- P(C\K): the previous step's accepted value, never recomputed
    p_without FLOAT NOT NULL,        -- P(C\(K u V)): measured at (run_id, item)
    delta FLOAT NOT NULL,
    decision VARCHAR NOT NULL,       -- keep | prune
    n_ablated INTEGER NOT NULL,      -- |C\K| after the decision
    run_id VARCHAR NOT NULL,         -- one run per lockstep step; identical (prompt, set) rows share an item
    item INTEGER NOT NULL,
    PRIMARY KEY (prune_id, prompt_id, tau, seed, step)
);

-- Feature sets per prompt: stage 1 (the chosen K's candidates), stage 2 (kept under every seed, per tau),
-- stage 3. One row per feature.
CREATE TABLE feature_sets (
    set_id VARCHAR NOT NULL,         -- the analysis that made it (candidates_id, prune_id, sweep_id)
    stage TINYINT NOT NULL,
    prompt_id VARCHAR NOT NULL,
    tau FLOAT,                       -- stage 2: the set's tau; NULL otherwise
    layer SMALLINT NOT NULL,
    feature INTEGER NOT NULL,
    score FLOAT,                     -- stage 1: cos(r, W_dec[feature]); stage 2: NULL
    selected BOOLEAN NOT NULL        -- the prompt's reported set (stage 2: the largest tau whose set jailbreaks)
);

-- Ablating a whole feature set, judged: stage-2 sets per tau and the random-active-features control.
CREATE TABLE set_checks (
    set_id VARCHAR NOT NULL,
    stage TINYINT NOT NULL,
    prompt_id VARCHAR NOT NULL,
    tau FLOAT,
    kind VARCHAR NOT NULL,           -- set | random (as many active features, same layers, drawn at random)
    n_features INTEGER NOT NULL,
    run_id VARCHAR NOT NULL,
    item INTEGER NOT NULL,
    p_i FLOAT NOT NULL,
    verdict VARCHAR NOT NULL,        -- the analysis judge's verdict (other judges: judgements by run_id, item)
    jailbroken BOOLEAN NOT NULL,
    selected BOOLEAN NOT NULL        -- the prompt's reported set, or the control drawn for it
);
