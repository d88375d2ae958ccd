"""The catalog's analysis tables, read and written in one place.

Analyses (`analyses` and the rows of their tables), the feature sets the stages select
(`feature_sets`), and the main job's record of finished stages (`pipeline_stages`). Inserts name
their columns (`BY NAME`). The stages' own bulk SQL (activation joins) stays beside the stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import polars as pl

from store import Store, UsageError
from store.store import code_version

Feature = tuple[int, int]                              # (layer, feature)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def save_analysis(store: Store, analysis_id_: str, kind: str, model: str, parent: str | None, judge: str,
                  settings: Any, metrics: dict[str, Any], tables: dict[str, tuple[str, pl.DataFrame]]) -> None:
    """Replace the analysis row and its rows in `tables` ({table: (id column, frame)}) in one transaction."""
    now = _now()
    with store.transaction() as con:
        con.execute("DELETE FROM analyses WHERE analysis_id = ?", [analysis_id_])
        con.execute("INSERT INTO analyses (analysis_id, kind, model, parent_id, judge, settings, metrics, created_at, "
                    "code_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [analysis_id_, kind, model, parent, judge, json.dumps(asdict(settings), sort_keys=True),
                     json.dumps(metrics, sort_keys=True), now, code_version()])
        for table, (column, frame) in tables.items():
            con.execute(f"DELETE FROM {table} WHERE {column} = ?", [analysis_id_])
            if frame.height:
                con.register("incoming", frame.to_arrow())
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
                con.unregister("incoming")


def latest_analysis(store: Store, kind: str, model: str, analysis_id_: str | None) -> dict[str, Any]:
    """The analyses row asked for, or the newest of that kind for the model; JSON columns decoded."""
    if analysis_id_:
        df = store.sql("SELECT * FROM analyses WHERE analysis_id = ? AND kind = ?", [analysis_id_, kind])
        if df.is_empty():
            raise UsageError(f"no {kind} analysis {analysis_id_} in {store.path}")
    else:
        df = store.sql("SELECT * FROM analyses WHERE kind = ? AND model = ? ORDER BY created_at DESC LIMIT 1",
                       [kind, model])
        if df.is_empty():
            raise UsageError(f"no {kind} analysis for {model} in {store.path}; run "
                             f"`python cli.py analyze {kind} --model {model} --store {store.path}` first")
    row = df.row(0, named=True)
    row["settings"] = json.loads(row["settings"])
    row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
    return row


def feature_sets(store: Store, set_id: str, stage: int, selected: bool = True) -> dict[str, tuple[Feature, ...]]:
    """prompt_id -> its (layer, feature) set of one analysis' stage (the selected set, unless `selected` is False)."""
    df = store.sql("SELECT DISTINCT prompt_id, layer, feature FROM feature_sets WHERE set_id = ? AND stage = ? "
                   + ("AND selected " if selected else "") + "ORDER BY ALL", [set_id, stage])
    sets: dict[str, list[Feature]] = {}
    for prompt_id, layer, feature in df.iter_rows():
        sets.setdefault(prompt_id, []).append((int(layer), int(feature)))
    return {p: tuple(f) for p, f in sets.items()}


def has_feature_sets(store: Store, set_id: str | None = None, stage: int | None = None) -> bool:
    """Whether the store holds selected feature sets (of one analysis, of one stage)."""
    df = store.sql("SELECT 1 FROM feature_sets WHERE selected AND (? IS NULL OR set_id = ?) AND (? IS NULL OR stage = ?) "
                   "LIMIT 1", [set_id, set_id, stage, stage])
    return not df.is_empty()


def recorded_stage(store: Store, model: str, stage: str, key: str) -> dict[str, Any] | None:
    """The main job's record of a finished stage (result_id, outputs, summary, seconds), None if it has none."""
    df = store.sql("SELECT result_id, outputs, summary, seconds FROM pipeline_stages "
                   "WHERE model = ? AND stage = ? AND settings_hash = ?", [model, stage, key])
    if df.is_empty():
        return None
    row = df.row(0, named=True)
    return {**row, "outputs": json.loads(row["outputs"])}


def record_stage(store: Store, model: str, stage: str, key: str, profile: str, result_id: str | None,
                 outputs: dict[str, Any], summary: str, settings: Any, seconds: float) -> None:
    """Replace the record of one finished stage."""
    with store.transaction() as con:
        con.execute("DELETE FROM pipeline_stages WHERE model = ? AND stage = ? AND settings_hash = ?", [model, stage, key])
        con.execute("INSERT INTO pipeline_stages (model, stage, settings_hash, profile, result_id, outputs, summary, "
                    "settings, seconds, finished_at, code_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                        model, stage, key, profile, result_id, json.dumps(outputs, sort_keys=True), summary,
                        json.dumps(settings, sort_keys=True, default=str), seconds, _now(), code_version()])


def newest_direction(store: Store, model: str) -> tuple[float, ...] | None:
    """The selected (l*) refusal direction of the model's newest direction analysis, if any."""
    df = store.sql("SELECT d.vector FROM directions d JOIN analyses a ON a.analysis_id = d.direction_id "
                   "WHERE a.model = ? AND d.selected ORDER BY a.created_at DESC LIMIT 1", [model])
    return None if df.is_empty() else tuple(float(x) for x in df["vector"][0])


def ablates_first(store: Store, analysis_id_: str | None) -> bool:
    """The position-0 rule (`ablate_first`) under which an analysis' sets were found: its own setting, else the
    nearest parent's that has one (a stage-3 sweep -> its prune analysis -> its candidates). Later stages ablate
    those sets the same way. True where none says (the default, and every analysis made before the setting)."""
    seen = set()
    while analysis_id_ and analysis_id_ not in seen:
        seen.add(analysis_id_)
        df = store.sql("SELECT settings, parent_id FROM analyses WHERE analysis_id = ?", [analysis_id_])
        if df.is_empty():
            break
        settings = json.loads(df["settings"][0]) if df["settings"][0] else {}
        if "ablate_first" in settings:
            return bool(settings["ablate_first"])
        analysis_id_ = df["parent_id"][0]
    return True


def newest_feature_sets_of(store: Store, model: str, stage: int) -> tuple[str | None, dict[str, tuple[Feature, ...]]]:
    """(the analysis id, prompt_id -> its selected stage-`stage` set) of the model's newest analysis with such sets."""
    df = store.sql("SELECT f.set_id FROM feature_sets f JOIN analyses a ON a.analysis_id = f.set_id "
                   "WHERE f.stage = ? AND a.model = ? ORDER BY a.created_at DESC LIMIT 1", [stage, model])
    return (None, {}) if df.is_empty() else (df["set_id"][0], feature_sets(store, df["set_id"][0], stage))


def newest_stage3(store: Store, model: str, prune_id: str) -> str | None:
    """The newest stage-3 analysis of the model on this prune analysis (or on sets passed in) with selected sets."""
    df = store.sql("SELECT a.analysis_id FROM analyses a WHERE a.kind = 'stage3' AND a.model = ? "
                   "AND (a.parent_id = ? OR a.parent_id IS NULL) AND EXISTS (SELECT 1 FROM feature_sets f "
                   "WHERE f.set_id = a.analysis_id AND f.stage = 3 AND f.selected) ORDER BY a.created_at DESC LIMIT 1",
                   [model, prune_id])
    return None if df.is_empty() else df.item(0, 0)


def paired_tests_frame(analysis_id_: str, tests: list[tuple[str, str, int, Any]]) -> pl.DataFrame:
    """`paired_tests` rows from (a, b, k, metrics.Paired) tuples: the 2x2 table, McNemar's p, the paired difference."""
    rows = [{"analysis_id": analysis_id_, "a": a, "b": b, "k": k, **paired.as_dict()} for a, b, k, paired in tests]
    schema = {"analysis_id": pl.String, "a": pl.String, "b": pl.String, "k": pl.Int32, "n_pairs": pl.Int32,
              "n_both": pl.Int32, "n_a_only": pl.Int32, "n_b_only": pl.Int32, "n_neither": pl.Int32,
              "p_value": pl.Float64, "diff": pl.Float64, "diff_low": pl.Float64, "diff_high": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def attribution_scores(store: Store, attribution_id: str) -> dict[str, dict[Feature, float]]:
    """prompt_id -> {(layer, feature): predicted delta of the metric when it is zero-ablated} of one attribution."""
    df = store.sql("SELECT prompt_id, layer, feature, score FROM attribution_scores WHERE attribution_id = ? "
                   "ORDER BY ALL", [attribution_id])
    scores: dict[str, dict[Feature, float]] = {}
    for prompt_id, layer, feature, score in df.iter_rows():
        scores.setdefault(prompt_id, {})[(int(layer), int(feature))] = float(score)
    return scores
