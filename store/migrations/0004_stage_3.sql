-- Stage 3: factorization machine, linear-probe baseline, the ablation sweep over top-K.
-- A sweep is an `analyses` row (migration 0003) with kind = 'fm', parent_id = its prune analysis
-- (NULL when the stage-2 sets were passed in), its judge and settings; its id is the sweep_id below.
-- Stage-3 sets go to `feature_sets` with stage = 3, set_id = sweep_id; verdicts to `judgements`.

-- One fitted classifier over SAE activations (FM or probe). Weights live in safetensors under
-- <store>/models/<model_id>.safetensors (column ids, embeddings, input scale), never pickled.
CREATE TABLE fm_models (
    model_id VARCHAR PRIMARY KEY,    -- sha256 of kind, settings and the data fingerprint [:16]
    kind VARCHAR NOT NULL,           -- fm | probe
    model VARCHAR NOT NULL,          -- the LLM whose SAE activations it was fitted on
    embedding INTEGER,               -- FM embedding size k (NULL for a probe)
    n_features INTEGER NOT NULL,     -- input columns: (layer, feature) pairs active in training
    train_acc FLOAT,
    val_acc FLOAT,
    test_acc FLOAT,
    best_epoch INTEGER,              -- FM: epoch whose validation accuracy was kept (1-based)
    mean_cosine FLOAT,               -- FM: mean pairwise cosine of the feature embeddings
    settings JSON NOT NULL,          -- the fit's settings
    data JSON NOT NULL,              -- layers, sae ids, n_last, prompts per split, data hash
    metrics JSON NOT NULL,           -- per-epoch history, chosen C, ...
    weights VARCHAR NOT NULL,        -- safetensors path relative to the store directory
    created_at TIMESTAMP NOT NULL,
    code_version VARCHAR NOT NULL
);

-- The ranked candidates per prompt: top max(K) non-stage-2 features by FM cosine or |probe weight|.
CREATE TABLE stage3_rankings (
    sweep_id VARCHAR NOT NULL,       -- = analyses.analysis_id (kind 'fm')
    ranker VARCHAR NOT NULL,         -- fm | probe
    prompt_id VARCHAR NOT NULL,
    rank INTEGER NOT NULL,           -- 1 = best
    layer SMALLINT NOT NULL,
    feature INTEGER NOT NULL,
    score FLOAT NOT NULL,            -- fm: cosine (max or mean over the stage-2 set); probe: |weight|
    PRIMARY KEY (sweep_id, ranker, prompt_id, rank)
);

-- Each prompt under each ablation (stage-2 set + top-K); k = 0 is the stage-2 set alone.
CREATE TABLE stage3_outcomes (
    sweep_id VARCHAR NOT NULL,
    ranker VARCHAR NOT NULL,         -- fm | probe | stage2 (k = 0)
    k INTEGER NOT NULL,
    prompt_id VARCHAR NOT NULL,
    n_ablated INTEGER NOT NULL,      -- features zero-ablated in total
    run_id VARCHAR NOT NULL,         -- the extraction run (its items row holds p_i and the completion)
    item INTEGER NOT NULL,
    p_i FLOAT,
    verdict VARCHAR NOT NULL,        -- the sweep judge's verdict (refusal | compliance | evasive)
    jailbroken BOOLEAN NOT NULL,     -- verdict = compliance
    PRIMARY KEY (sweep_id, ranker, k, prompt_id)
);

-- Attack success rate per (ranker, K): the share of swept prompts judged jailbroken.
CREATE TABLE stage3_asr (
    sweep_id VARCHAR NOT NULL,
    ranker VARCHAR NOT NULL,
    k INTEGER NOT NULL,
    n_prompts INTEGER NOT NULL,
    n_jailbroken INTEGER NOT NULL,
    asr FLOAT NOT NULL,
    run_id VARCHAR NOT NULL,
    PRIMARY KEY (sweep_id, ranker, k)
);
