"""CoCoNot taxonomy of features (paper Fig. 3), and feature explanations imported from a file.

The paper maps features to CoCoNot's UNSAFE requests ("Requests with safety concerns") and their
harm subcategories, 2,586 prompts. The shipped file (data/coconot/coconot_eval.jsonl, CoCoNot's
eval set) holds 395 of them, every one taken by default (`subset = "unsafe"`, `level =
"subcategory"`): 91 misinformation, 88 privacy violations, 82 dangerous or sensitive topics, 33
copyright violations, 29 triggers for offensive language (the paper's five harm subcategories,
323 prompts) plus 71 `wildchats` and 1 `incomprehensible`, which the eval set files under the same
category and which are kept and shown as their own rows. The paper's larger count presumably
comes from CoCoNot's train split, which is not shipped (data/coconot/ATTRIBUTION.md); the
deviation is the number of prompts, not the rule. `subset = "all"` maps every category, as this
module did before.

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
from extract.datasets import Prompt, load_prompts
from queries.run import named_query
from store import Store, UsageError
from analyze.metrics import rate_text
from analyze.text import frame_text
from store.settings import Settings

LEVELS = ("category", "subcategory")
FEATURE_SOURCES = ("sets", "all")
SUBSETS = ("unsafe", "all")
UNSAFE_CATEGORY = "Requests with safety concerns"   # CoCoNot's unsafe requests (paper Fig. 3)
PAPER_N_UNSAFE = 2586                              # the unsafe prompts the paper mapped
_LAYER_ALIASES = ("layer",)
_FEATURE_ALIASES = ("feature", "index", "latent", "feature_id", "feature_index")
_TEXT_ALIASES = ("explanation", "description", "label", "text")
_LEADING_INT = re.compile(r"\s*(\d+)")


@dataclass(frozen=True)
class TaxonomySettings(Settings):
    level: str = "subcategory"            # category | subcategory (with subset all: "category/subcategory")
    subset: str = "unsafe"                # unsafe: CoCoNot's unsafe requests, as the paper's Fig. 3 | all
    min_prompts: int = 1                  # a feature belongs to a category when it fires on >= this many of its prompts
    features: str = "sets"                # sets: features of the store's feature sets | all

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise UsageError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.min_prompts < 1:
            raise UsageError(f"min_prompts must be >= 1, got {self.min_prompts}")
        if self.subset not in SUBSETS:
            raise UsageError(f"subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}")
        if self.features not in FEATURE_SOURCES:
            raise UsageError(f"features must be one of {', '.join(FEATURE_SOURCES)}, got {self.features!r}")



@dataclass(frozen=True)
class TaxonomyResult:
    mapping: pl.DataFrame                 # layer, feature, n_categories, categories (list), n_prompts, explanation
    per_category: pl.DataFrame            # category, n_features
    multi_category: pl.DataFrame          # n_categories, n_features
    prompts: pl.DataFrame                 # category, n_prompts: the CoCoNot prompts the store holds with SAE codes
    sql: dict[str, str]                   # the query behind each frame


def taxonomy_sql(settings: TaxonomySettings, explicit: bool = False) -> dict[str, str]:
    """The SQL of each result frame; `explicit`: features come from a registered frame `wanted` (layer, feature)."""
    mapping = named_query("taxonomy_mapping").strip().rstrip(";")
    group = {"category": "category", "subcategory": "category || '/' || subcategory"}[settings.level]
    if settings.level == "subcategory" and settings.subset == "unsafe":
        group = "subcategory"                             # one category: its subcategories are the rows
    subset = f"AND m.category = '{UNSAFE_CATEGORY}'" if settings.subset == "unsafe" else ""
    if explicit:
        wanted = "SELECT layer, feature FROM wanted"
    elif settings.features == "sets":
        wanted = "SELECT DISTINCT layer, feature FROM feature_sets WHERE selected"
    else:
        wanted = None
    keep = f"WHERE (m.layer, m.feature) IN ({wanted}) {subset}" if wanted else f"WHERE TRUE {subset}"
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
        "prompts": _prompts_sql(group, subset),
    }


def _prompts_sql(group: str, subset: str) -> str:
    """CoCoNot prompts with SAE codes in the store, per category as the mapping groups them."""
    return ("-- CoCoNot prompts of unablated complete runs that stored SAE codes, per category\n"
            "WITH m AS (\n    SELECT DISTINCT i.prompt_id, split_part(p.category, '/', 1) AS category,\n"
            "           substr(p.category, length(split_part(p.category, '/', 1)) + 2) AS subcategory\n"
            "    FROM items i JOIN runs r ON r.run_id = i.run_id AND r.status = 'complete'\n"
            "    JOIN prompts p ON p.prompt_id = i.prompt_id JOIN interventions s ON s.spec_hash = i.spec_hash\n"
            "    WHERE p.dataset = 'coconot' AND s.spec = '{}'\n"
            "      AND EXISTS (SELECT 1 FROM layers l WHERE l.run_id = i.run_id AND l.sae_id IS NOT NULL)\n)\n"
            f"SELECT {group} AS category, count(*) AS n_prompts FROM m WHERE TRUE {subset}\n"
            "GROUP BY ALL ORDER BY n_prompts DESC, category")


def coconot_prompts(subset: str = "unsafe", limit: int | None = None) -> list[Prompt]:
    """The shipped CoCoNot eval prompts of the subset, in the dataset's seeded order; the first `limit` (None: all)."""
    if subset not in SUBSETS:
        raise UsageError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    prompts = load_prompts("coconot")
    if subset == "unsafe":
        prompts = [p for p in prompts if (p.category or "").split("/", 1)[0] == UNSAFE_CATEGORY]
    return prompts[:limit]


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
    return TaxonomyResult(out["mapping"], out["per_category"], out["multi_category"], out["prompts"], sql)


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
    n_prompts = int(r.prompts["n_prompts"].sum()) if r.prompts.height else 0
    return (f"{r.mapping.height} features fire on {n_prompts} CoCoNot prompts, in {r.per_category.height} categories "
            f"({multi} in more than one: {rate_text(multi, r.mapping.height)})")


def detail_lines(r: TaxonomyResult) -> list[str]:
    """Features per category, per number of categories, and the first 40 mappings."""
    if r.mapping.is_empty():
        return []
    return [frame_text(r.prompts), frame_text(r.per_category), frame_text(r.multi_category),
            frame_text(r.mapping.head(40))]
