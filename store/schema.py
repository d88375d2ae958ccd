"""Catalog schema: the format version and the ordered list of migrations.

A store records `format_version` (the on-disk layout: catalog + Zarr paths) and `schema_version`
(how many migrations ran). Migration 1 is below; later stages add theirs as numbered files
`store/migrations/NNNN_name.sql` (applied in order), never by editing one that has shipped.
"""

from pathlib import Path

FORMAT_VERSION = 1
MIGRATION_DIR = Path(__file__).resolve().parent / "migrations"

MIGRATIONS: list[str] = [
    # 1: the extraction tables
    """
    CREATE TABLE prompts (
        prompt_id VARCHAR PRIMARY KEY,   -- sha256(dataset \\0 text)[:16]
        dataset VARCHAR NOT NULL,
        idx INTEGER NOT NULL,            -- row in the source file
        split VARCHAR NOT NULL,          -- train | val | test (seeded 80/10/10)
        label TINYINT NOT NULL,          -- 1 harmful, 0 benign, -1 unknown
        category VARCHAR,
        text VARCHAR NOT NULL
    );
    CREATE TABLE chats (
        model VARCHAR NOT NULL,
        prompt_id VARCHAR NOT NULL,
        chat_text VARCHAR NOT NULL,      -- the prompt inside the model's chat template
        n_tokens INTEGER NOT NULL,
        PRIMARY KEY (model, prompt_id)
    );
    CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY,      -- sha256 of the canonical request JSON [:16]
        model VARCHAR NOT NULL,
        sae_set JSON,                    -- {layer: sae source}
        intervention JSON,               -- the spec, or {"per_item": true}
        settings JSON,                   -- layers, positions, generate, dtype, threshold ...
        status VARCHAR NOT NULL,         -- running | complete
        n_items INTEGER NOT NULL,
        n_rows INTEGER NOT NULL,
        created_at TIMESTAMP NOT NULL,
        completed_at TIMESTAMP,
        code_version VARCHAR NOT NULL
    );
    CREATE TABLE interventions (
        spec_hash VARCHAR PRIMARY KEY,
        spec JSON NOT NULL
    );
    CREATE TABLE items (
        run_id VARCHAR NOT NULL,
        item INTEGER NOT NULL,           -- index of (prompt, intervention) in the run
        prompt_id VARCHAR NOT NULL,
        spec_hash VARCHAR NOT NULL,
        row_start INTEGER NOT NULL,      -- this item's rows are [row_start, row_start + n_rows)
        n_rows INTEGER NOT NULL,
        n_tokens INTEGER NOT NULL,
        p_i FLOAT,                       -- P(first reply token is the model's "I") at the last prompt position
        refusal_score FLOAT,             -- log P(refusal tokens) - log(1 - P(refusal tokens))
        top_token_id INTEGER,
        completion VARCHAR,              -- greedy completion when generation was asked for
        PRIMARY KEY (run_id, item)
    );
    CREATE TABLE tokens (
        run_id VARCHAR NOT NULL,
        row INTEGER NOT NULL,            -- row of this run's Zarr arrays
        item INTEGER NOT NULL,
        prompt_id VARCHAR NOT NULL,
        pos INTEGER NOT NULL,            -- token position in the chat text, 0-based
        token_id INTEGER NOT NULL,
        token_text VARCHAR NOT NULL,
        role VARCHAR NOT NULL            -- first | template | user | post_instruction
    );
    CREATE TABLE layers (
        run_id VARCHAR NOT NULL,
        layer SMALLINT NOT NULL,         -- residual after decoder block `layer` (HF hidden_states[layer+1])
        d_model INTEGER NOT NULL,
        resid_array VARCHAR,             -- Zarr path of the [n_rows, d_model] residuals, or NULL
        sae_id VARCHAR,                  -- SAE whose activations are in sae_acts, or NULL
        PRIMARY KEY (run_id, layer)
    );
    CREATE TABLE saes (
        sae_id VARCHAR PRIMARY KEY,
        model VARCHAR NOT NULL,
        layer SMALLINT NOT NULL,
        source VARCHAR NOT NULL,         -- sae-lens release:id, or a directory
        architecture VARCHAR NOT NULL,   -- jumprelu | topk | batchtopk | standard
        d_in INTEGER NOT NULL,
        d_sae INTEGER NOT NULL,
        settings JSON,
        metrics JSON,
        created_at TIMESTAMP NOT NULL
    );
    CREATE TABLE sae_acts (
        run_id VARCHAR NOT NULL,
        row INTEGER NOT NULL,
        layer SMALLINT NOT NULL,
        feature INTEGER NOT NULL,
        value FLOAT NOT NULL             -- only latents above the run's threshold (settings.threshold)
    );
    """,
]


def _numbered_migrations() -> list[str]:
    files = sorted(MIGRATION_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    numbers = [int(f.name[:4]) for f in files]
    assert len(set(numbers)) == len(numbers) and min(numbers, default=2) >= 2, f"migration numbers: {numbers}"
    return [f.read_text() for f in files]


MIGRATIONS += _numbered_migrations()

# Tables whose rows belong to one run: staged as Parquet while the run is written, merged into
# the catalog in the single transaction that commits the run.
RUN_TABLES = ("items", "tokens", "layers", "sae_acts")
