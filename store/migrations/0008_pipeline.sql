-- The main job's record of finished stages (`cli.py run`, analyze/pipeline.py), one row each.
-- A rerun skips a stage whose key (its settings and the result ids of the stages it reads) is recorded
-- here and whose result is still in the store; a stage killed midway has no row and runs again.
CREATE TABLE IF NOT EXISTS pipeline_stages (
    model VARCHAR NOT NULL,          -- registry name or path, as loaded
    stage VARCHAR NOT NULL,          -- saes | direction | candidates | prune | fm | redundancy | controls | costs | taxonomy | report
    settings_hash VARCHAR NOT NULL,  -- sha256[:16] of the stage, model, settings and the result ids it reads
    profile VARCHAR NOT NULL,        -- quick | default | a settings file's name: the profile that ran it
    result_id VARCHAR,               -- the stage's own result: analysis / costs / run id, SAE settings, report path
    outputs JSON NOT NULL,           -- what later stages read when this one is resumed (SAE sources, l*, counts)
    summary VARCHAR NOT NULL,        -- what it did, one line (the progress line)
    settings JSON NOT NULL,          -- the stage's settings as run
    seconds DOUBLE NOT NULL,         -- wall time of the stage
    finished_at TIMESTAMP NOT NULL,  -- UTC
    code_version VARCHAR NOT NULL,   -- package version + git commit
    PRIMARY KEY (model, stage, settings_hash)
);
