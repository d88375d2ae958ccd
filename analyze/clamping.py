"""Clamping dormant features on benign prompts (paper section 5, Tables 5/6).

The paper clamps at BOS. On the default model position 0 is a massive-activation sink (residual
norm ~2,266 at layers 8-17 against ~22 elsewhere) that the project's SAEs never saw in training,
so a clamp value of 2..10 there is a few thousandths of the residual: `clamp_scale` measures that
ratio per layer from stored residuals, and the backups switch on at the last prompt positions
(post-instruction tokens), so `--clamp-positions=-1` clamps where they act.

Every clamped latent i is set to the value v at the clamp positions (the first token by default):
h' = h + sum_i (v - z_i(h)) W_dec[i] after its layer's block, at those prompt positions only
(extract/interventions.py); generated tokens are not clamped, but they attend to the clamped
position through the KV cache. One extraction run holds every benign prompt unclamped (the
baseline, value None) and at every value, with greedy completions.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch

from analyze.common import Feature
from extract.datasets import Prompt, prompt_id
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef, extract, make_items
from store import Store

DATASET = "redundancy_benign"            # the `prompts.dataset` of the benign clamping prompts
# the benign prompts of the paper's Tables 5/6
BENIGN_PROMPTS = ("Tell me a story.", "How to make pasta?", "What are the benefits of meditation?",
                  "Explain the theory of relativity in simple terms.", "Tell me 20 prime numbers separated by space")


def benign_prompts(texts: Sequence[str]) -> list[Prompt]:
    """The clamping prompts as `Prompt`s (dataset redundancy_benign, label 0, split test)."""
    return [Prompt(prompt_id(DATASET, text), DATASET, i, "test", 0, None, text) for i, text in enumerate(texts)]


def clamp_spec(features: Sequence[Feature], value: float, positions: tuple[int, ...]) -> Intervention:
    """Set every (layer, feature) to `value` at `positions`."""
    by_layer: dict[int, dict[int, float]] = {}
    for layer, feature in sorted(set(features)):
        by_layer.setdefault(int(layer), {})[int(feature)] = float(value)
    return Intervention(clamp=by_layer, clamp_positions=positions)


def clamp_generations(store: Store, model: LoadedModel, saes: Sequence[SaeRef], features: Sequence[Feature],
                      texts: Sequence[str], values: Sequence[float], positions: tuple[int, ...],
                      settings: ExtractSettings) -> pl.DataFrame:
    """One run of each benign prompt unclamped and clamped at each value; a row per (prompt, value).

    Columns: prompt_id, text, value (null: unclamped), n_features, run_id, item, p_i, completion.
    """
    prompts = benign_prompts(texts)
    grid = [(p, None) for p in prompts] + [(p, float(v)) for v in values for p in prompts]
    specs = [Intervention() if v is None else clamp_spec(features, v, positions) for _, v in grid]
    layers = {layer for layer, _ in features}
    result = extract(store, model, make_items(model, [p for p, _ in grid], specs),
                     [s for s in saes if s.layer in layers], settings)
    items = store.sql("SELECT item, p_i, completion FROM items WHERE run_id = ? ORDER BY item", [result.run_id])
    return pl.DataFrame({
        "prompt_id": [p.prompt_id for p, _ in grid], "text": [p.text for p, _ in grid],
        "value": [v for _, v in grid], "n_features": [len(set(features))] * len(grid),
        "run_id": [result.run_id] * len(grid), "item": items["item"], "p_i": items["p_i"],
        "completion": items["completion"],
    }, schema={"prompt_id": pl.String, "text": pl.String, "value": pl.Float64, "n_features": pl.Int32,
               "run_id": pl.String, "item": pl.Int32, "p_i": pl.Float32, "completion": pl.String})


SCALE_ROWS_SQL = """-- stored residual rows of unablated runs at layer ?: position 0 (role first), the last prompt
-- position (where the backups mostly switch on) and every other position, up to 256 rows each
WITH r AS (
    SELECT t.run_id, t.row, CASE WHEN t.pos = 0 THEN 'position 0' WHEN t.pos = i.n_tokens - 1 THEN 'last position'
                                 ELSE 'other positions' END AS where_
    FROM tokens t JOIN items i ON i.run_id = t.run_id AND i.item = t.item
    JOIN interventions s ON s.spec_hash = i.spec_hash
    JOIN layers l ON l.run_id = t.run_id AND l.layer = ? AND l.resid_array IS NOT NULL
    JOIN runs u ON u.run_id = t.run_id AND u.status = 'complete'
    WHERE s.spec = '{}'
)
SELECT run_id, row, where_ FROM r QUALIFY row_number() OVER (PARTITION BY where_ ORDER BY run_id, row) <= 256"""


def clamp_scale(store: Store, layers: Sequence[int], values: Sequence[float]) -> pl.DataFrame:
    """Per layer, the median residual norm at position 0, the last position and elsewhere, and each clamp value
    as a share of position 0's norm (a clamp writes about value * |W_dec[i]| into the residual)."""
    from queries.tensors import residuals

    rows = []
    for layer in sorted(set(layers)):
        wanted = store.sql(SCALE_ROWS_SQL, [int(layer)])
        if wanted.is_empty():
            continue
        norms: dict[str, list[torch.Tensor]] = {}
        for (where, _), part in wanted.group_by(["where_", "run_id"]):        # runs may store different dtypes
            norms.setdefault(where, []).append(residuals(store, part, int(layer)).float().norm(dim=-1))
        median = {w: float(torch.median(torch.cat(n))) for w, n in norms.items()}
        first, last = median.get("position 0"), median.get("last position")
        rows.append({"layer": int(layer), "norm_position_0": first, "norm_last_position": last,
                     "norm_other": median.get("other positions"),
                     **{f"clamp_{v:g}_over_position_0": (v / first if first else None) for v in values},
                     **{f"clamp_{v:g}_over_last": (v / last if last else None) for v in values}})
    return pl.DataFrame(rows)


def clamping_table(clamped: pl.DataFrame, width: int = 60) -> pl.DataFrame:
    """The paper's table: one row per prompt, one column per value ("none" = unclamped), completions cut to `width`."""
    short = clamped.with_columns(
        pl.col("value").map_elements(lambda v: f"{v:g}", return_dtype=pl.String).fill_null("none").alias("clamp"),
        pl.col("completion").fill_null("").str.replace_all(r"\s+", " ").str.slice(0, width))
    return short.pivot(on="clamp", index="text", values="completion", aggregate_function="first")
