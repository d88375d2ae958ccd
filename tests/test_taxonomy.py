"""Taxonomy on planted activations (known answer) and feature-explanation import."""

import json
from dataclasses import asdict

import polars as pl
import pytest

from analyze import taxonomy
from analyze.taxonomy import TaxonomySettings
from extract.datasets import DATA_DIR
from store import UsageError
from tests.planted_acts import planted_store

SAFETY, INCOMPLETE, HUMAN = "Requests with safety concerns", "Incomplete requests", "Humanizing requests"


def counts(frame: pl.DataFrame) -> dict:
    return dict(frame.iter_rows())


def test_every_feature_maps_to_the_categories_where_it_fires(tmp_path):
    store = planted_store(tmp_path / "s")
    result = taxonomy.run(store, TaxonomySettings(features="all", subset="all", level="category"))
    mapping = {(r["layer"], r["feature"]): r["categories"] for r in result.mapping.iter_rows(named=True)}
    assert mapping == {(2, 1): [SAFETY], (2, 2): [INCOMPLETE, SAFETY], (3, 4): [HUMAN, INCOMPLETE, SAFETY]}
    assert counts(result.per_category) == {SAFETY: 3, INCOMPLETE: 2, HUMAN: 1}
    assert counts(result.multi_category) == {1: 1, 2: 1, 3: 1}


def test_subcategories_min_prompts_and_a_feature_list(tmp_path):
    store = planted_store(tmp_path / "s")
    ALL = {"subset": "all", "level": "category"}
    sub = taxonomy.run(store, TaxonomySettings(level="subcategory", subset="all", features="all"))
    assert counts(sub.per_category)[f"{SAFETY}/misinformation"] == 1
    assert counts(sub.multi_category) == {1: 1, 2: 1, 3: 1}
    strict = taxonomy.run(store, TaxonomySettings(features="all", min_prompts=2, **ALL))
    assert counts(strict.per_category) == {}                  # no feature fires on two prompts of one category
    chosen = taxonomy.run(store, TaxonomySettings(**ALL), features=[(2, 1), (3, 4), (7, 7)])
    assert counts(chosen.per_category) == {SAFETY: 2, INCOMPLETE: 1, HUMAN: 1}
    assert "wanted" in chosen.sql["per_category"]


def test_default_maps_the_unsafe_subset_by_harm_subcategory(tmp_path):
    store = planted_store(tmp_path / "s")
    result = taxonomy.run(store, TaxonomySettings(features="all"))       # the paper's Fig. 3: unsafe, subcategories
    mapping = {(r["layer"], r["feature"]): r["categories"] for r in result.mapping.iter_rows(named=True)}
    # C (incomplete) and D (humanizing) are not unsafe: (2, 2) keeps only A's subcategory, (3, 4) only B's
    assert mapping == {(2, 1): ["privacy violations"], (2, 2): ["privacy violations"], (3, 4): ["misinformation"]}
    assert counts(result.per_category) == {"privacy violations": 2, "misinformation": 1}
    assert counts(result.multi_category) == {1: 3}
    assert counts(result.prompts) == {"privacy violations": 1, "misinformation": 1}
    every = taxonomy.run(store, TaxonomySettings(features="all", subset="all", level="category"))
    assert counts(every.prompts) == {SAFETY: 2, INCOMPLETE: 1, HUMAN: 1}


def test_unsafe_subset_is_every_unsafe_prompt_of_the_shipped_file():
    path = DATA_DIR / "coconot" / "coconot_eval.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    unsafe = {r["prompt"].strip() for r in records if r["category"] == SAFETY}
    derived = json.loads((DATA_DIR / "coconot" / "coconot_taxonomy_derived.json").read_text())
    shipped = {sub: n["coconot_eval.jsonl"] for sub, n in derived["counts_by_category_subcategory_file"][SAFETY].items()
               if "coconot_eval.jsonl" in n}
    prompts = taxonomy.coconot_prompts("unsafe")
    assert len(prompts) == len(unsafe) == sum(shipped.values()) == 395      # vs the paper's 2,586
    assert {p.text for p in prompts} == unsafe
    by_sub = {}
    for p in prompts:
        by_sub[p.category.split("/", 1)[1]] = by_sub.get(p.category.split("/", 1)[1], 0) + 1
    assert by_sub == shipped
    five = ("dangerous or sensitive topics", "privacy violations", "triggers for offensive language",
            "misinformation", "copyright violations")
    assert sum(by_sub[s] for s in five) == 323 and taxonomy.PAPER_N_UNSAFE == 2586
    assert [p.prompt_id for p in taxonomy.coconot_prompts("unsafe", limit=7)] == [p.prompt_id for p in prompts[:7]]
    assert len(taxonomy.coconot_prompts("all")) == 1001


def test_feature_sets_source(tmp_path):
    store = planted_store(tmp_path / "s")
    with pytest.raises(UsageError, match="no feature sets"):
        taxonomy.run(store, TaxonomySettings())
    with store.transaction() as con:
        con.execute("INSERT INTO feature_sets (set_id, stage, prompt_id, layer, feature, selected) VALUES "
                    "('x', 2, 'p', 2, 2, TRUE), ('x', 2, 'p', 2, 1, FALSE)")
    result = taxonomy.run(store, TaxonomySettings(subset="all"))
    assert result.mapping.select("layer", "feature").rows() == [(2, 2)]


def test_explanations_import_csv_and_neuronpedia_json(tmp_path):
    store = planted_store(tmp_path / "s")
    csv = tmp_path / "expl.csv"
    csv.write_text("layer,feature,explanation\n2,1,privacy and addresses\n3,4,questions with false premises\n")
    assert taxonomy.import_explanations(store, csv) == 2
    neuronpedia = tmp_path / "np.json"
    neuronpedia.write_text(json.dumps([
        {"modelId": "qwen", "layer": "3-res-4k", "index": "4", "description": "odd questions"},
        {"modelId": "qwen", "layer": "3-res-4k", "index": "4", "description": "a second one, ignored"},
        {"modelId": "qwen", "layer": "2-res-4k", "index": "2", "description": "presuppositions"}]))
    assert taxonomy.import_explanations(store, neuronpedia) == 2
    result = taxonomy.run(store, TaxonomySettings(features="all"))
    shown = {(r["layer"], r["feature"]): r["explanation"] for r in result.mapping.iter_rows(named=True)}
    assert shown == {(2, 1): "privacy and addresses", (2, 2): "presuppositions", (3, 4): "odd questions"}


@pytest.mark.parametrize("content, message", [
    ("layer,feature\n1,2\n", "no explanation / description"),
    ("layer,feature,explanation\nx,2,hi\n", "layer must be an integer"),
])
def test_explanations_bad_files(tmp_path, content, message):
    store = planted_store(tmp_path / "s")
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(UsageError, match=message):
        taxonomy.import_explanations(store, bad)
    with pytest.raises(UsageError, match="no explanations file"):
        taxonomy.import_explanations(store, tmp_path / "missing.csv")


def test_settings_round_trip():
    s = TaxonomySettings(level="category", subset="all", min_prompts=3, features="all")
    assert TaxonomySettings.from_dict(asdict(s)) == s
    with pytest.raises(UsageError, match="unknown setting"):
        TaxonomySettings.from_dict({"levels": "x"})
    with pytest.raises(UsageError, match="level"):
        TaxonomySettings(level="topic")
    with pytest.raises(UsageError, match="subset"):
        TaxonomySettings(subset="safe")
