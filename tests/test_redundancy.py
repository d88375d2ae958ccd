"""Redundancy on a tiny Llama with a planted backup circuit (tests/planted_backup.py).

The stage-2 set of every harmful prompt is {A, R} (active) + {B, DEAD} (dormant); stage 3 is {X}.
Expected from the wiring, not from the code under test: B (layer 2) switches on at position 0
(role 'first', the BOS token) with z = S once A (layer 1) is ablated, DEAD never; ablating A + R
leaves the refusal, the whole set breaks it; ablating X switches R off and leaves A untouched.
"""

import json
from dataclasses import asdict

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from analyze import clamping, redundancy
from analyze.catalog import save_analysis
from analyze.prune import PruneSettings
from analyze.redundancy import RedundancySettings
from cli import app
from extract.datasets import load_prompts
from extract.interventions import Intervention
from extract.models import load_model
from extract.run import ExtractSettings, SaeRef, extract, make_items
from extract.saes import decoder_rows, load_sae
from store import Store, UsageError
from tests import planted_backup as pb

PRUNE_ID, SWEEP_ID = "prune00000000001", "sweep00000000001"
STAGE2 = ((1, pb.A), (1, pb.R), (2, pb.B), (2, pb.DEAD))
STAGE3 = ((0, pb.X),)
FAST = dict(judge="p_i", clamp_generate=6, batch_size=8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return pb.build_planted_backup(tmp_path_factory.mktemp("planted-backup"))


@pytest.fixture(scope="module")
def model(planted):
    return load_model(str(planted.model_dir))


@pytest.fixture(scope="module")
def saes(planted, model):
    return [SaeRef(layer, str(path), load_sae(str(path))) for layer, path in sorted(planted.sae_dirs.items())]


def _seed_store(path, planted, model, saes, stage3: bool = True) -> Store:
    """A store holding what stages 2 (and 3) write: feature_sets, the prune analysis, set_checks, a sweep."""
    store = Store.create(path)
    prompts = load_prompts(str(planted.harmful))
    check = extract(store, model, make_items(model, prompts), saes, ExtractSettings(positions="last:1"))
    ids = [p.prompt_id for p in prompts]
    sets = pl.DataFrame([(pid, 0.5, layer, f) for pid in ids for layer, f in STAGE2],
                        schema={"prompt_id": pl.String, "tau": pl.Float64, "layer": pl.Int16, "feature": pl.Int32},
                        orient="row").with_columns(pl.lit(PRUNE_ID).alias("set_id"), pl.lit(2, pl.Int8).alias("stage"),
                                                   pl.lit(None, pl.Float32).alias("score"), pl.lit(True).alias("selected"))
    checks = pl.DataFrame({"prompt_id": ids, "tau": [0.5] * 3, "kind": ["set"] * 3, "n_features": [4] * 3,
                           "run_id": [check.run_id] * 3, "item": [0, 1, 2], "p_i": [0.0] * 3,
                           "verdict": ["compliance"] * 3, "jailbroken": [True] * 3, "selected": [True] * 3},
                          schema_overrides={"n_features": pl.Int32, "item": pl.Int32, "p_i": pl.Float32}
                          ).with_columns(pl.lit(PRUNE_ID).alias("set_id"), pl.lit(2, pl.Int8).alias("stage"))
    save_analysis(store, PRUNE_ID, "prune", model.name, None, "p_i@0.5", PruneSettings(), {},
                  {"feature_sets": ("set_id", sets), "set_checks": ("set_id", checks)})
    if stage3:                                            # a sweep is an `fm` analysis (migration 0004)
        s3 = pl.DataFrame([(pid, layer, f) for pid in ids for layer, f in STAGE3],
                          schema={"prompt_id": pl.String, "layer": pl.Int16, "feature": pl.Int32}, orient="row")
        save_analysis(store, SWEEP_ID, "stage3", model.name, PRUNE_ID, "p_i@0.5", PruneSettings(), {},
                      {"feature_sets": ("set_id", s3.with_columns(
                          pl.lit(SWEEP_ID).alias("set_id"), pl.lit(3, pl.Int8).alias("stage"),
                          pl.lit(True).alias("selected")))})
    return store


@pytest.fixture(scope="module")
def result(tmp_path_factory, planted, model, saes):
    store = _seed_store(tmp_path_factory.mktemp("store") / "s", planted, model, saes)
    return store, redundancy.run(store, model, RedundancySettings(**FAST))


def test_settings_round_trip():
    s = RedundancySettings(prune_id="p", stage3_id="none", saes=("3=dir",), clamp_values=(1.5, 3.0), max_prompts=4)
    assert RedundancySettings.from_dict(json.loads(json.dumps(asdict(s)))) == s
    assert RedundancySettings.from_dict(asdict(RedundancySettings())) == RedundancySettings()
    for bad in ({"judge": "nope"}, {"saes": ("x",)}, {"clamp_positions": (3, 0)}, {"max_prompts": 0},
                {"benign_prompts": ()}):
        with pytest.raises(UsageError):
            RedundancySettings(**bad)
    with pytest.raises(UsageError, match="unknown setting"):
        RedundancySettings.from_dict({"tau": 1})


def test_dormant_features_are_the_planted_ones(result):
    _, res = result
    f = res.tables["redundancy_features"]
    assert f.height == 3 * len(STAGE2)
    dormant = set(f.filter("inactive").select("layer", "feature").iter_rows())
    assert dormant == {(2, pb.B), (2, pb.DEAD)}
    a = f.filter((pl.col("layer") == 1) & (pl.col("feature") == pb.A))
    assert (a["n_active_pos"] == 1).all() and np.allclose(a["first_value"], pb.S)   # A lives on BOS only
    assert (f.filter((pl.col("feature") == pb.R))["n_active_pos"] >= 2).all()       # the header tokens


def test_removing_the_dormant_features_breaks_the_jailbreak(result):
    _, res = result
    a = res.tables["redundancy_ablations"]
    jb = {(k, p): j for p, k, j in a.select("prompt_id", "kind", "jailbroken").iter_rows()}
    for pid in a["prompt_id"].unique():
        assert not jb[("clean", pid)] and jb[("set", pid)]
        assert not jb[("inactive", pid)] and not jb[("active", pid)]
        assert jb[("stage3", pid)] is False
    assert res.tables["redundancy_prompts"]["kept"].all()
    m = res.metrics
    assert (m["n_set_jailbroken"], m["n_active_only_jailbroken"], m["n_kept"]) == (3, 0, 3)


def test_backup_switches_on_at_the_first_token(result):
    store, res = result
    s = res.tables["redundancy_switch_on"]
    assert s.height == 3                                                   # one event per prompt
    assert set(s.select("layer", "feature", "pos", "role").iter_rows()) == {(2, pb.B, 0, "first")}
    assert (s["token_text"] == "<|begin_of_text|>").all() and s["upstream"].all() and not s["same_layer"].any()
    assert np.allclose(s["value"], pb.S, atol=1e-3)
    stored = store.sql("SELECT count(*) AS n, min(role) AS role FROM redundancy_switch_on WHERE analysis_id = ?",
                       [res.analysis_id])
    assert stored.row(0) == (3, "first")
    sw = res.metrics["switch_on"]
    assert sw["role_shares"]["first"] == 1.0 and sw["n_switched_beyond_pos0"] == 0
    assert sw["role_shares_ci"]["first"] == pytest.approx([3 / (3 + 1.959963984540054 ** 2), 1.0])   # Wilson, k = n = 3
    assert sw["role_shares_ci"]["template"] == pytest.approx([0.0, 1 - 3 / (3 + 1.959963984540054 ** 2)])
    assert (sw["n_switched"], sw["n_dormant"]) == (3, 6)


def test_clamping_table_and_clamped_activation(result):
    store, res = result
    c = res.tables["redundancy_clamping"]
    assert c.height == 5 * 6 and c["value"].null_count() == 5
    assert set(c["value"].drop_nulls()) == {2.0, 4.0, 6.0, 8.0, 10.0} and (c["n_features"] == 1).all()
    assert set(c["text"]) == set(clamping.BENIGN_PROMPTS)
    # the run's own SAE reading after the edit: z_B = v at position 0, and B nowhere else
    got = store.sql("SELECT t.pos, a.value, i.spec_hash FROM sae_acts a JOIN tokens t USING (run_id, row) "
                    "JOIN items i ON i.run_id = t.run_id AND i.item = t.item "
                    "WHERE a.run_id = ? AND a.layer = 2 AND a.feature = ?", [c["run_id"][0], pb.B])
    assert set(got["pos"]) == {0} and got.height == 25
    assert sorted(set(np.round(got["value"].to_numpy(), 4))) == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert res.metrics["clamping"]["n_refused"] == {"none": 0, "2": 0, "4": 0, "6": 0, "8": 0, "10": 0}
    table = clamping.clamping_table(c)
    assert table.columns == ["text", "none", "2", "4", "6", "8", "10"] and table.height == 5


def test_clamping_falls_back_to_all_prompts_when_none_is_kept(result, model, saes):
    """No kept prompt (no hydra effect): the features that switched on anywhere are clamped, and it says so."""
    store, res = result
    settings = RedundancySettings(**FAST, clamp_values=(4.0,))
    runner = redundancy._Runner(store, model, redundancy.get_judge(settings.judge), settings, lambda *_: None)
    none_kept = res.tables["redundancy_prompts"].with_columns(pl.lit(False).alias("kept"))
    c = redundancy._clamp(runner, saes, res.tables["redundancy_switch_on"], none_kept)
    assert c.height == 5 * 2 and (c["clamp_source"] == "all prompts").all()
    assert set(c["value"].drop_nulls()) == {4.0} and (c["n_features"] == 1).all()     # B, the one that switched on
    assert redundancy._clamp_metrics(c, settings)["source"] == "all prompts"
    nothing = redundancy._clamp(runner, saes, res.tables["redundancy_switch_on"].clear(), none_kept)
    assert nothing.is_empty()
    assert redundancy._clamp_metrics(res.tables["redundancy_clamping"], settings)["source"] == "kept prompts"


def test_stage3_links(result):
    _, res = result
    links = res.tables["redundancy_links"]
    assert links.height == 6                                               # A and R on 3 prompts
    off = links.filter("deactivated")
    assert set(off["feature"]) == {pb.R} and off["upstream"].all()
    rest = links.filter(~pl.col("deactivated"))
    assert set(rest["feature"]) == {pb.A} and np.allclose(rest["activation_drop"], 0, atol=1e-5)
    k = res.metrics["links"]
    assert (k["n_reproduced"], k["n_set_jailbroken"], k["n_deactivated"]) == (0, 3, 3)
    assert k["mean_deactivated_share"] == 0.5 and k["max_deactivated_share"] == 0.5


def test_rerun_finds_everything_and_summary(result, model):
    store, res = result
    again = redundancy.run(store, model, RedundancySettings(**FAST))
    assert again.analysis_id == res.analysis_id
    n = store.sql("SELECT count(*) FROM redundancy_analyses").item()
    assert n == 1
    text = redundancy.summary(res)
    assert "by token role: first 100% [44%, 100%] (3/3), template 0% [0%, 56%] (0/3)" in text and "without position 0: 0 features" in text
    assert "5. stage-3 only: reproduces 0 of 3 stage-2 jailbreaks" in text


def test_without_stage3_and_cli(tmp_path, planted, model, saes):
    store = _seed_store(tmp_path / "s", planted, model, saes, stage3=False)
    res = CliRunner().invoke(app, ["analyze", "redundancy", "--model", str(planted.model_dir), "--store",
                                   str(tmp_path / "s"), "--judge", "p_i", "--clamp-values", "4"])
    assert res.exit_code == 0, res.output
    assert "5. stage-3 only: not run: no stage-3 sets" in res.output
    assert "3. switch-on (kept prompts): 3 of 6 dormant features fire" in res.output
    assert "clamped on 'Tell me a story.':\n   none  compliance" in res.output and "\n      4  compliance" in res.output
    row = store.sql("SELECT stage3_id, stage3_run_id, metrics FROM redundancy_analyses").row(0)
    assert row[0] is None and row[1] is None and json.loads(row[2])["links"]["status"].startswith("not run")


def test_cli_without_stage2_sets(tmp_path, planted):
    Store.create(tmp_path / "empty")
    res = CliRunner().invoke(app, ["analyze", "redundancy", "--model", str(planted.model_dir),
                                   "--store", str(tmp_path / "empty"), "--judge", "p_i"])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no prune analysis for"), res.output


def test_clamp_changes_exactly_the_clamped_position(planted, model, saes, tmp_path):
    """Residual after layer 2: the clamped column moves by (v - z_B) W_dec[B]; every other column keeps its bits."""
    store = Store.create(tmp_path / "s")
    prompt = clamping.benign_prompts(["Explain how to bake bread."])[0]
    specs = [Intervention(), clamping.clamp_spec([(2, pb.B)], 6.0, (0,)), clamping.clamp_spec([(2, pb.B)], 6.0, (3,))]
    run = extract(store, model, make_items(model, [prompt] * 3, specs), saes, ExtractSettings(layers=(2, 3)))
    n = len(make_items(model, [prompt])[0].chat.input_ids)
    resid = {layer: store.read_rows(run.run_id, f"resid/{layer}", np.arange(3 * n)).reshape(3, n, -1)
             for layer in (2, 3)}
    w_b = decoder_rows(saes[2].sae, [pb.B])[0].numpy()
    for spec, pos in ((1, 0), (2, 3)):
        diff = resid[2][spec] - resid[2][0]                                # [n, d_model]
        np.testing.assert_allclose(diff[pos], 6.0 * w_b, atol=1e-5)        # z_B = 0 there before the clamp
        others = np.delete(np.arange(n), pos)
        assert np.array_equal(resid[2][spec][others], resid[2][0][others])
        before = np.arange(pos)                                            # layer 3 mixes positions >= pos only
        assert np.array_equal(resid[3][spec][before], resid[3][0][before])
        assert not np.array_equal(resid[3][spec][pos:], resid[3][0][pos:])
