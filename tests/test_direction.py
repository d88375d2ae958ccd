"""Refusal direction on a tiny model with a planted refusal direction: found, at its layer, with controls."""

from dataclasses import asdict

import numpy as np
import pytest

from analyze import direction
from analyze.direction import DirectionSettings
from analyze.metrics import wilson
from extract.models import load_model
from store import Store, UsageError
from tests.planted import N_LAYERS, PLANTED_LAYER, direction_settings


@pytest.fixture(scope="module")
def found(planted, planted_stage1):
    store, model = planted_stage1                       # the session's stage-1 store: this run is cached
    return store, model, direction.run(store, model, direction_settings(planted))


def test_direction_finds_planted_direction_and_layer(found, planted):
    _, _, result = found
    assert result.layer == PLANTED_LAYER
    assert float(result.vector @ planted.direction) > 0.95
    table = result.layers
    asr = dict(zip(table["layer"], table["asr"]))
    assert asr[PLANTED_LAYER] == 1.0
    assert all(asr[layer] == 0.0 for layer in range(PLANTED_LAYER))       # before the write: nothing to ablate
    assert asr[N_LAYERS - 1] is None                                      # last 20% of the depth: not a candidate


def test_controls_random_directions_do_neither(found):
    _, _, result = found
    c = result.controls
    assert c["add_refusal"] == 1.0 and c["baseline_benign_refusal"] == 0.0
    assert c["random_ablation_asr"] == [0.0, 0.0]
    assert c["random_add_refusal"] == [0.0, 0.0]
    assert c["n_refused"] == c["n_val_harmful"] > 0


def test_directions_table_and_runs_in_the_store(found):
    store, _, result = found
    rows = store.sql("SELECT * FROM directions WHERE direction_id = ? ORDER BY layer", [result.direction_id])
    assert rows.height == N_LAYERS and rows["selected"].sum() == 1
    norms = [np.linalg.norm(v) for v in rows["vector"].to_list()]
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    n = result.controls["n_refused"]
    for row in rows.iter_rows(named=True):                  # each evaluated layer's ASR with its Wilson interval
        if not row["evaluated"]:
            assert row["asr_ci_low"] is None and row["asr_ci_high"] is None
            continue
        assert (row["asr_ci_low"], row["asr_ci_high"]) == pytest.approx(wilson(round(row["asr"] * n), n))
        assert row["asr_ci_low"] <= row["asr"] <= row["asr_ci_high"]
    at_planted = rows.row(PLANTED_LAYER, named=True)
    assert at_planted["asr"] == 1.0 and at_planted["asr_ci_high"] == pytest.approx(1.0) and at_planted["asr_ci_low"] < 1
    # every forward went through an extraction run in the store
    runs = set(store.sql("SELECT run_id FROM runs WHERE status = 'complete'")["run_id"])
    assert set(result.controls["runs"].values()) <= runs


def test_rerun_is_a_cache_hit(found, planted):
    store, model, result = found
    n_runs = store.sql("SELECT count(*) AS n FROM runs")["n"][0]
    again = direction.run(store, model, direction_settings(planted))
    assert again.direction_id == result.direction_id and again.layer == result.layer
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == n_runs
    assert store.sql("SELECT count(*) AS n FROM analyses WHERE kind = 'direction'")["n"][0] == 1


def test_plots_are_written(found, tmp_path):
    from analyze.plots import direction_plots
    store, _, result = found
    files = direction_plots(store, result.direction_id, tmp_path)
    assert [f.suffix for f in files] == [".png", ".png"] and all(f.stat().st_size > 1000 for f in files)


def test_settings_round_trip_and_validation():
    s = DirectionSettings(layers=(3, 5), add_scale=2.5, judge="p_i@0.3")
    assert DirectionSettings.from_dict(asdict(s)) == s
    assert DirectionSettings.from_dict({"layers": [1, 2]}).layers == (1, 2)
    with pytest.raises(UsageError, match="unknown setting"):
        DirectionSettings.from_dict({"layer": 3})
    with pytest.raises(UsageError, match="unknown judge"):
        DirectionSettings(judge="gpt4")
    with pytest.raises(UsageError, match="n_val"):
        DirectionSettings(n_val=0)


def test_no_refused_prompt_is_a_usage_error(planted, tmp_path):
    store = Store.create(tmp_path / "s")
    model = load_model(str(planted.model_dir))
    with pytest.raises(UsageError, match="refuses none"):
        direction.run(store, model, direction_settings(planted, judge="p_i@0.99", n_train=4, n_val=2))
