-- Issue 13: what a committed run wrote into Zarr, so that a missing or damaged chunk file is found
-- (`cli.py store check`, store/check.py) instead of reading back as zeros. One row per chunk file,
-- recorded when the run is committed; a run committed before this migration has none (its chunks are
-- then checked against the array's shape only). A damaged run gets runs.status = 'damaged' on repair:
-- the next identical extraction recomputes it and replaces its rows.
CREATE TABLE IF NOT EXISTS array_chunks (
    run_id VARCHAR NOT NULL,
    array_name VARCHAR NOT NULL,     -- under arrays.zarr/runs/<run_id>/: resid/<layer>, completion_ids, logits_last
    chunk_key VARCHAR NOT NULL,      -- the chunk's file under the array, e.g. c/5/0
    n_bytes BIGINT NOT NULL,         -- the file's size as committed
    crc32 BIGINT NOT NULL,           -- zlib.crc32 of the file as committed
    PRIMARY KEY (run_id, array_name, chunk_key)
);
