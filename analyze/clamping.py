"""Clamping dormant features on benign prompts (paper section 5, Tables 5/6).

Every clamped latent i is set to the value v at the clamp positions (the first token by default):
h' = h + sum_i (v - z_i(h)) W_dec[i] after its layer's block, at those prompt positions only
(extract/interventions.py); generated tokens are not clamped, but they attend to the clamped
position through the KV cache. One extraction run holds every benign prompt unclamped (the
baseline, value None) and at every value, with greedy completions.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

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


def clamping_table(clamped: pl.DataFrame, width: int = 60) -> pl.DataFrame:
    """The paper's table: one row per prompt, one column per value ("none" = unclamped), completions cut to `width`."""
    short = clamped.with_columns(
        pl.col("value").map_elements(lambda v: f"{v:g}", return_dtype=pl.String).fill_null("none").alias("clamp"),
        pl.col("completion").fill_null("").str.replace_all(r"\s+", " ").str.slice(0, width))
    return short.pivot(on="clamp", index="text", values="completion", aggregate_function="first")
