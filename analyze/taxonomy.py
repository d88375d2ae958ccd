"""CoCoNot taxonomy of features (paper Fig. 3), and feature explanations imported from a file.

A feature belongs to every CoCoNot category on whose prompts it is non-zero (`sae_acts` joined to
`tokens` and `prompts`; the rule and the tokens that count are in queries/taxonomy_mapping.sql), so
one feature can belong to several categories. The counts are per category and per number of
categories. Which features: those in the store's feature sets (`feature_sets`, the reported rows of
every stage), every feature, or a list given by the caller. Needs extraction runs over the CoCoNot
prompts with the SAEs: `python cli.py extract --dataset coconot --limit 0`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from analyze.common import Feature
from queries.run import named_query
from store import Store, UsageError
from analyze.text import frame_text
from store.settings import Settings

LEVELS = ("category", "subcategory")
FEATURE_SOURCES = ("sets", "all")
_LAYER_ALIASES = ("layer",)
_FEATURE_ALIASES = ("feature", "index", "latent", "feature_id", "feature_index")
_TEXT_ALIASES = ("explanation", "description", "label", "text")
_LEADING_INT = re.compile(r"\s*(\d+)")


@dataclass(frozen=True)
class TaxonomySettings(Settings):
    level: str = "category"               # category | subcategory ("category/subcategory")
    min_prompts: int = 1                  # a feature belongs to a category when it fires on >= this many of its prompts
    features: str = "sets"                # sets: features of the store's feature sets | all

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise UsageError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.min_prompts < 1:
            raise UsageError(f"min_prompts must be >= 1, got {self.min_prompts}")
        if self.features not in FEATURE_SOURCES:
            raise UsageError(f"features must be one of {', '.join(FEATURE_SOURCES)}, got {self.features!r}")



@dataclass(frozen=True)
class TaxonomyResult:
    mapping: pl.DataFrame                 # layer, feature, n_categories, categories (list), n_prompts, explanation
    per_category: pl.DataFrame            # category, n_features
    multi_category: pl.DataFrame          # n_categories, n_features
    sql: dict[str, str]                   # the query behind each frame


def taxonomy_sql(settings: TaxonomySettings, explicit: bool = False) -> dict[str, str]:
    """The SQL of each result frame; `explicit`: features come from a registered frame `wanted` (layer, feature)."""
    mapping = named_query("taxonomy_mapping").strip().rstrip(";")
    group = "category" if settings.level == "category" else "category || '/' || subcategory"
    if explicit:
        wanted = "SELECT layer, feature FROM wanted"
    elif settings.features == "sets":
        wanted = "SELECT DISTINCT layer, feature FROM feature_sets WHERE selected"
    else:
        wanted = None
    keep = f"WHERE (m.layer, m.feature) IN ({wanted})" if wanted else ""
    member = (f"WITH mapping AS (\n{mapping}\n),\nmember AS (\n"
              f"    SELECT m.layer, m.feature, {group} AS category, sum(m.n_prompts) AS n_prompts\n"
              f"    FROM mapping m {keep}\n    GROUP BY ALL HAVING sum(m.n_prompts) >= {int(settings.min_prompts)}\n)\n")
    return {
        "mapping": member + (
            "SELECT b.layer, b.feature, count(*) AS n_categories, list(b.category ORDER BY b.category) AS categories,\n"
            "       sum(b.n_prompts) AS n_prompts, any_value(e.explanation) AS explanation\n"
            "FROM member b LEFT JOIN feature_explanations e ON e.layer = b.layer AND e.feature = b.feature\n"
            "GROUP BY b.layer, b.feature ORDER BY n_categories DESC, b.layer, b.feature"),
        "per_category": member + (
            "SELECT category, count(*) AS n_features FROM member GROUP BY category ORDER BY n_features DESC, category"),
        "multi_category": member + (
            "SELECT n_categories, count(*) AS n_features\n"
            "FROM (SELECT layer, feature, count(*) AS n_categories FROM member GROUP BY layer, feature)\n"
            "GROUP BY n_categories ORDER BY n_categories"),
    }


def run(store: Store, settings: TaxonomySettings, features: Sequence[Feature] | None = None) -> TaxonomyResult:
    """Features mapped to CoCoNot categories, per-category counts and multi-category counts."""
    explicit = features is not None
    sql = taxonomy_sql(settings, explicit)
    frames = {"wanted": pl.DataFrame({"layer": [int(l) for l, _ in features], "feature": [int(f) for _, f in features]},
                                     schema={"layer": pl.Int16, "feature": pl.Int32})} if explicit else None
    if not explicit and settings.features == "sets" and store.sql("SELECT count(*) AS n FROM feature_sets")["n"][0] == 0:
        raise UsageError("the store has no feature sets yet; run the stages (`python cli.py analyze prune`) "
                         "or map every feature with --features all")
    out = {name: store.sql(q, frames=frames) for name, q in sql.items()}
    return TaxonomyResult(out["mapping"], out["per_category"], out["multi_category"], sql)


# ---- explanations ------------------------------------------------------------------------------

def import_explanations(store: Store, path: str | Path) -> int:
    """Load (layer, feature, explanation) rows from a CSV / JSON / JSONL file into `feature_explanations`.

    Columns: layer; feature (or index, latent); explanation (or description, label). A Neuronpedia
    export works as is: its layer "20-gemmascope-res-16k" is read as 20, index as the feature. A
    feature listed twice keeps its first explanation; re-importing a feature replaces it.
    """
    path = Path(path)
    records = _records(path)
    rows: dict[Feature, str] = {}
    for k, rec in enumerate(records):
        layer = _as_int(_pick(rec, _LAYER_ALIASES, path, k), "layer", path, k)
        feature = _as_int(_pick(rec, _FEATURE_ALIASES, path, k), "feature", path, k)
        text = str(_pick(rec, _TEXT_ALIASES, path, k)).strip()
        if text:
            rows.setdefault((layer, feature), text)
    if not rows:
        raise UsageError(f"{path} has no explanations")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    frame = pl.DataFrame({"layer": [l for l, _ in rows], "feature": [f for _, f in rows],
                          "explanation": list(rows.values()), "source": [path.name] * len(rows),
                          "imported_at": [now] * len(rows)},
                         schema={"layer": pl.Int16, "feature": pl.Int32, "explanation": pl.String,
                                 "source": pl.String, "imported_at": pl.Datetime("us")})
    with store.transaction() as con:
        con.register("incoming", frame.to_arrow())
        con.execute("DELETE FROM feature_explanations WHERE (layer, feature) IN (SELECT layer, feature FROM incoming)")
        con.execute("INSERT INTO feature_explanations BY NAME SELECT * FROM incoming")
        con.unregister("incoming")
    return len(rows)


def _records(path: Path) -> list[dict[str, Any]]:
    expected = "expected a .csv, .json or .jsonl file with columns layer, feature (or index), explanation (or description)"
    if not path.is_file():
        raise UsageError(f"no explanations file at {path}; {expected}")
    try:
        if path.suffix.lower() == ".csv":
            return pl.read_csv(path, infer_schema=False).to_dicts()
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix.lower() != ".json":
            raise UsageError(f"cannot read {path.name}: {expected}")
        data = json.loads(text)
    except (json.JSONDecodeError, pl.exceptions.PolarsError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path}: {str(err).strip().splitlines()[0]}") from None
    if isinstance(data, dict):                          # {"explanations": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UsageError(f"{path}: {expected}")
    return data


def _pick(rec: dict[str, Any], aliases: tuple[str, ...], path: Path, k: int) -> Any:
    for key in aliases:
        if rec.get(key) not in (None, ""):
            return rec[key]
    raise UsageError(f"{path} record {k}: no {' / '.join(aliases)} (found {sorted(rec)})")


def _as_int(value: Any, what: str, path: Path, k: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _LEADING_INT.match(str(value))
    if not match:
        raise UsageError(f"{path} record {k}: {what} must be an integer, got {value!r}")
    return int(match.group(1))


def summary_line(r: TaxonomyResult) -> str:
    """One line: features mapped, categories, and how many sit in more than one."""
    if r.mapping.is_empty():
        return ("no feature fires on CoCoNot prompts; extract them with SAEs first: "
                "python cli.py extract --dataset coconot --limit 0")
    multi = int(r.multi_category.filter(pl.col("n_categories") > 1)["n_features"].sum())
    return (f"{r.mapping.height} features fire on CoCoNot prompts, in {r.per_category.height} categories "
            f"({multi} in more than one)")


def detail_lines(r: TaxonomyResult) -> list[str]:
    """Features per category, per number of categories, and the first 40 mappings."""
    if r.mapping.is_empty():
        return []
    return [frame_text(r.per_category), frame_text(r.multi_category), frame_text(r.mapping.head(40))]
