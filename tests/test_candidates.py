"""Stage 1 on the planted model: the planted latents rank first and C_10 jailbreaks every refused prompt."""

from dataclasses import asdict

import pytest

from analyze import candidates, direction
from analyze.candidates import CandidateSettings
from extract.models import load_model
from store import Store, UsageError
from tests.planted import PLANTED_FEATURES, PLANTED_LAYER, candidate_settings, direction_settings


@pytest.fixture(scope="module")
def stage1(planted, planted_stage1):
    store, model = planted_stage1                       # the session's stage-1 store: this run is cached
    return store, model, candidates.run(store, model, candidate_settings(planted))


def test_planted_latents_rank_first(stage1):
    _, _, result = stage1
    top = result.ranking.filter(result.ranking["layer"] == PLANTED_LAYER).sort("rank").head(len(PLANTED_FEATURES))
    assert sorted(top["feature"].to_list()) == sorted(PLANTED_FEATURES)
    assert min(top["cos"]) > 0.95
    assert result.ranking["layer"].unique().sort().to_list() == [2, 3]        # layers 0-1 excluded


def test_smallest_k_jailbreaks_every_refused_prompt(stage1):
    store, _, result = stage1
    assert result.metrics["n_refused"] == 4 and result.metrics["n_jailbroken"] == 4
    assert result.prompts["k"].to_list() == [10] * 4
    assert (result.prompts["p_i_at_k"] < 0.05).all() and (result.prompts["p_i_clean"] > 0.5).all()
    rows = store.sql("SELECT * FROM candidate_sets WHERE candidates_id = ?", [result.candidates_id])
    assert rows.filter(rows["k"] == 0).height == 4 and rows["chosen"].sum() == 4
    # the K sweep is batched: one run for the clean pass, one per round of K values
    assert rows["run_id"].n_unique() == 2
    sets = store.sql("SELECT prompt_id, count(*) AS n, count(DISTINCT layer) AS n_layers FROM feature_sets "
                     "WHERE set_id = ? AND stage = 1 GROUP BY prompt_id", [result.candidates_id])
    assert sets["n"].to_list() == [20] * 4 and sets["n_layers"].to_list() == [2] * 4


def test_candidate_set_is_top_k_of_every_layer(stage1):
    _, _, result = stage1
    c3 = candidates.candidate_set(result.ranking, 3)
    assert sorted(f for layer, f in c3 if layer == PLANTED_LAYER) == sorted(PLANTED_FEATURES)
    assert len(c3) == 6


def test_usage_errors(planted, tmp_path):
    store = Store.create(tmp_path / "s")
    model = load_model(str(planted.model_dir))
    with pytest.raises(UsageError, match="analyze direction"):
        candidates.run(store, model, candidate_settings(planted))
    direction.run(store, model, direction_settings(planted))
    with pytest.raises(UsageError, match="no SAE layer is left"):
        candidates.run(store, model, candidate_settings(planted, exclude_layers=(0, 1, 2, 3)))


def test_settings_round_trip_and_validation():
    s = CandidateSettings(saes=("2=/x",), ks=(10, 30), exclude_layers=(0,))
    assert CandidateSettings.from_dict(asdict(s)) == s
    with pytest.raises(UsageError, match="ascending"):
        CandidateSettings(ks=(20, 10))
    with pytest.raises(UsageError, match="unknown setting"):
        CandidateSettings.from_dict({"k": 3})


def test_ablate_first_is_hashed_only_when_set_and_reaches_the_spec():
    from analyze.common import ablation
    from analyze.candidates import CandidateSettings

    from analyze.prune import PruneSettings

    assert "ablate_first" not in CandidateSettings().hashed()             # existing candidates ids stay
    assert "ablate_first" not in PruneSettings().hashed() and PruneSettings(ablate_first=False).hashed()["ablate_first"] is False
    assert CandidateSettings(ablate_first=False).hashed()["ablate_first"] is False
    assert CandidateSettings.from_dict({"ablate_first": False}) == CandidateSettings(ablate_first=False)
    assert ablation([(3, 1)]).to_json() == '{"zero_ablate":{"3":[1]}}'
    skip = ablation([(3, 1), (3, 0)], first=False)
    assert skip.zero_ablate == {3: (0, 1)} and skip.zero_ablate_first is False
