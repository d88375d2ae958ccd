"""Taxonomy on planted activations (known answer) and feature-explanation import."""

import json
from dataclasses import asdict

import polars as pl
import pytest

from analyze import taxonomy
from analyze.taxonomy import TaxonomySettings
from store import UsageError
from tests.planted_acts import planted_store

SAFETY, INCOMPLETE, HUMAN = "Requests with safety concerns", "Incomplete requests", "Humanizing requests"


def counts(frame: pl.DataFrame) -> dict:
    return dict(frame.iter_rows())


def test_every_feature_maps_to_the_categories_where_it_fires(tmp_path):
    store = planted_store(tmp_path / "s")
    result = taxonomy.run(store, TaxonomySettings(features="all"))
    mapping = {(r["layer"], r["feature"]): r["categories"] for r in result.mapping.iter_rows(named=True)}
    assert mapping == {(2, 1): [SAFETY], (2, 2): [INCOMPLETE, SAFETY], (3, 4): [HUMAN, INCOMPLETE, SAFETY]}
    assert counts(result.per_category) == {SAFETY: 3, INCOMPLETE: 2, HUMAN: 1}
    assert counts(result.multi_category) == {1: 1, 2: 1, 3: 1}


def test_subcategories_min_prompts_and_a_feature_list(tmp_path):
    store = planted_store(tmp_path / "s")
    sub = taxonomy.run(store, TaxonomySettings(level="subcategory", features="all"))
    assert counts(sub.per_category)[f"{SAFETY}/misinformation"] == 1
    assert counts(sub.multi_category) == {1: 1, 2: 1, 3: 1}
    strict = taxonomy.run(store, TaxonomySettings(features="all", min_prompts=2))
    assert counts(strict.per_category) == {}                  # no feature fires on two prompts of one category
    chosen = taxonomy.run(store, TaxonomySettings(), features=[(2, 1), (3, 4), (7, 7)])
    assert counts(chosen.per_category) == {SAFETY: 2, INCOMPLETE: 1, HUMAN: 1}
    assert "wanted" in chosen.sql["per_category"]


def test_feature_sets_source(tmp_path):
    store = planted_store(tmp_path / "s")
    with pytest.raises(UsageError, match="no feature sets"):
        taxonomy.run(store, TaxonomySettings())
    with store.transaction() as con:
        con.execute("INSERT INTO feature_sets (set_id, stage, prompt_id, layer, feature, selected) VALUES "
                    "('x', 2, 'p', 2, 2, TRUE), ('x', 2, 'p', 2, 1, FALSE)")
    result = taxonomy.run(store, TaxonomySettings())
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
    s = TaxonomySettings(level="subcategory", min_prompts=3, features="all")
    assert TaxonomySettings.from_dict(asdict(s)) == s
    with pytest.raises(UsageError, match="unknown setting"):
        TaxonomySettings.from_dict({"levels": "x"})
    with pytest.raises(UsageError, match="level"):
        TaxonomySettings(level="topic")
