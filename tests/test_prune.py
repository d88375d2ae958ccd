"""Stage 2 (Algorithm 1) on the planted model: exactly the planted latents, bookkeeping that adds up."""

import json
from dataclasses import asdict

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from analyze import prune
from analyze.common import ablation, evaluate, load_saes, stored_prompts
from analyze.prune import PruneSettings
from cli import app
from extract.run import ExtractSettings, extract, make_items
from store import Store, UsageError
from tests.planted import PLANTED_FEATURES, PLANTED_LAYER

PLANTED = {(PLANTED_LAYER, f) for f in PLANTED_FEATURES}


@pytest.fixture(scope="module")
def stage1(planted_stage1):
    return planted_stage1


@pytest.fixture(scope="module")
def pruned(stage1):
    """Stage 2 with the paper's settings (N = 5, 8 taus, 3 seeds), judged on P("I")."""
    store, model = stage1
    return prune.run(store, model, PruneSettings(judge="p_i"))


def steps_of(store, result) -> pl.DataFrame:
    return store.sql("SELECT * FROM pruning_steps WHERE prune_id = ? ORDER BY prompt_id, tau, seed, step",
                     [result.prune_id])


def stage2_sets(store, result) -> dict:
    df = store.sql("SELECT prompt_id, tau, layer, feature FROM feature_sets WHERE set_id = ? AND stage = 2",
                   [result.prune_id])
    sets: dict = {}
    for prompt_id, tau, layer, feature in df.iter_rows():
        sets.setdefault((prompt_id, round(tau, 3)), set()).add((layer, feature))
    return sets


def test_single_feature_blocks_keep_exactly_the_planted_latents_under_every_seed(stage1):
    store, model = stage1
    result = prune.run(store, model, PruneSettings(block_size=1, judge="p_i"))
    steps = steps_of(store, result)
    for (_, _, _), run in steps.group_by(["prompt_id", "tau", "seed"]):
        kept = {(l[0], f[0]) for l, f, d in zip(run["block_layers"], run["block_features"], run["decision"])
                if d == "keep"}
        assert kept == PLANTED
    sets = stage2_sets(store, result)
    assert len(sets) == 4 * 8 and all(s == PLANTED for s in sets.values())
    assert result.summary["n_jailbroken"] == 4 and result.summary["n_random_jailbroken"] == 0
    assert result.summary["n_unique_features"] == 3 and result.summary["per_layer_unique"] == {"2": 3}
    assert result.summary["set_sizes"] == {"n": 4, "mean": 3.0, "std": 0.0, "min": 3, "median": 3.0, "max": 3}
    assert (result.summary["ci_low"], result.summary["ci_high"]) == pytest.approx((0.5101, 1.0), abs=1e-4)


def test_magnitude_matched_control_draws_from_the_same_activation_quantiles(planted, stage1):
    store, model = stage1
    settings = PruneSettings(block_size=1, judge="p_i")
    result = prune.run(store, model, settings)                   # the store holds it: a cache hit
    checks = store.sql("SELECT * FROM set_checks WHERE set_id = ? AND selected", [result.prune_id])
    prompts = stored_prompts(store, sorted(checks["prompt_id"].unique()))
    clean_run = extract(store, model, make_items(model, prompts), [s for s in load_saes(store, model, planted.sae_specs) if s.layer in (2, 3)],
                        ExtractSettings(positions="all")).run_id               # prune's clean run: a store hit
    clean = store.sql("SELECT t.prompt_id, a.layer, a.feature, max(a.value) AS value FROM sae_acts a JOIN tokens t "
                      "USING (run_id, row) WHERE a.run_id = ? GROUP BY ALL", [clean_run])
    for prompt_id in checks["prompt_id"].unique():
        mine = checks.filter((pl.col("prompt_id") == prompt_id) & (pl.col("kind") == "random_magnitude"))
        spec = store.sql("SELECT spec FROM items JOIN interventions USING (spec_hash) WHERE run_id = ? AND item = ?",
                         [mine["run_id"][0], int(mine["item"][0])])["spec"][0]
        drawn = {(2, f) for f in json.loads(spec)["zero_ablate"].get("2", [])}
        values = {(l, f): v for p, l, f, v in clean.iter_rows() if p == prompt_id and l == PLANTED_LAYER}
        assert len(drawn) == 3 and not drawn & PLANTED and drawn <= set(values)
        edges = np.quantile(list(values.values()), [0.25, 0.5, 0.75])          # quartiles of the layer's values
        planted_bins = sorted(int(np.searchsorted(edges, values[f], side="right")) for f in PLANTED)
        drawn_bins = sorted(int(np.searchsorted(edges, values[f], side="right")) for f in drawn)
        n_top = sum(1 for f in values if np.searchsorted(edges, values[f], side="right") == planted_bins[-1])
        if n_top - 3 >= 3:                                          # enough others in the planted latents' quartile
            assert drawn_bins == planted_bins, prompt_id
    control = result.summary["controls"]["random_magnitude"]
    assert control["n_prompts"] == 4 and control["n_jailbroken"] == 0
    assert control["paired"]["n_a_only"] == 4 and control["paired"]["p_value"] == pytest.approx(2 / 16)
    tests = store.sql("SELECT * FROM paired_tests WHERE analysis_id = ? ORDER BY b", [result.prune_id])
    assert tests["b"].to_list() == ["random", "random_magnitude"] and tests["n_a_only"].to_list() == [4, 4]
    assert tests["p_value"].to_list() == pytest.approx([0.125, 0.125])


def test_blocks_of_five_keep_only_blocks_holding_a_planted_latent(stage1, pruned):
    store, model = stage1
    result = pruned
    steps = steps_of(store, result)
    for row in steps.iter_rows(named=True):
        block = set(zip(row["block_layers"], row["block_features"]))
        assert (row["decision"] == "keep") == bool(block & PLANTED), row
    for s in stage2_sets(store, result).values():
        assert PLANTED <= s


def test_bookkeeping_adds_up(stage1, pruned):
    store, model = stage1
    result = pruned
    steps = steps_of(store, result)
    pools = store.sql("SELECT prompt_id, count(*) AS n FROM feature_sets WHERE stage = 1 GROUP BY prompt_id")
    pool = dict(zip(pools["prompt_id"], pools["n"]))
    for (prompt_id, _, _), run in steps.group_by(["prompt_id", "tau", "seed"], maintain_order=True):
        blocks = [set(zip(l, f)) for l, f in zip(run["block_layers"], run["block_features"])]
        assert sum(map(len, blocks)) == len(set().union(*blocks)) == pool[prompt_id]     # blocks partition C
        assert run["step"].to_list() == list(range(run.height))
        kept = sum(len(b) for b, d in zip(blocks, run["decision"]) if d == "keep")
        assert run["n_ablated"][-1] == kept                                    # C \ K = the kept blocks
        for prev, row in zip(run.head(-1).iter_rows(named=True), run.tail(-1).iter_rows(named=True)):
            accepted = prev["p_without"] if prev["decision"] == "prune" else prev["p_base"]
            assert row["p_base"] == accepted                                   # never recomputed
        delta = (run["p_base"] - run["p_without"]).abs() / run["p_base"]
        np.testing.assert_allclose(run["delta"], delta, rtol=1e-5)
        assert ((run["delta"] >= run["tau"]) == (run["decision"] == "keep")).all()
    # lockstep: one extraction run per step, holding every (prompt, tau, seed) run's row
    assert steps["run_id"].n_unique() == result.summary["n_steps"]
    assert steps.group_by("run_id").len()["len"].to_list() == [4 * 8 * 3] * result.summary["n_steps"]


def test_measured_p_matches_an_independent_single_forward(stage1, pruned, planted):
    store, model = stage1
    result = pruned
    run = steps_of(store, result).filter((pl.col("seed") == 1) & (pl.col("tau") == 0.5))
    run = run.filter(pl.col("prompt_id") == run["prompt_id"][0])
    prompt = stored_prompts(store, [run["prompt_id"][0]])[0]
    pool = set(store.sql("SELECT layer, feature FROM feature_sets WHERE stage = 1 AND prompt_id = ?",
                         [prompt.prompt_id]).iter_rows())
    pruned, specs = set(), []
    for row in run.iter_rows(named=True):                  # rebuild C \ (K u V) step by step
        block = set(zip(row["block_layers"], row["block_features"]))
        specs.append(ablation(sorted(pool - pruned - block)))
        pruned |= block if row["decision"] == "prune" else set()
    alone = evaluate(store, model, [prompt] * len(specs), specs, load_saes(store, model, planted.sae_specs),
                     ExtractSettings(positions="last:1", batch_size=1), dedupe=False)
    np.testing.assert_allclose(alone.p_i, run["p_without"].to_numpy(), rtol=1e-4, atol=1e-6)


def test_dedupe_changes_nothing_but_the_number_of_forwards(stage1):
    store, model = stage1
    a = prune.run(store, model, PruneSettings(judge="p_i", taus=(0.1, 0.8), seeds=(0, 1)))
    b = prune.run(store, model, PruneSettings(judge="p_i", taus=(0.1, 0.8), seeds=(0, 1), dedupe=False))
    cols = ["prompt_id", "tau", "seed", "step", "decision", "n_ablated"]
    assert steps_of(store, a).select(cols).equals(steps_of(store, b).select(cols))
    assert a.summary["n_forward_items"] < b.summary["n_forward_items"] == b.summary["n_evaluations"]


def test_minimal_sets_jailbreak_and_random_controls_do_not(stage1, pruned):
    store, model = stage1
    result = pruned
    checks = store.sql("SELECT * FROM set_checks WHERE set_id = ?", [result.prune_id])
    chosen = checks.filter(pl.col("selected"))
    assert chosen.filter(pl.col("kind") == "set")["jailbroken"].all()
    control = chosen.filter(pl.col("kind") == "random")
    assert control.height == 4 and not control["jailbroken"].any()
    assert (control["n_features"].to_list() == chosen.filter(pl.col("kind") == "set")["n_features"].to_list())


def test_settings_round_trip_and_validation():
    s = PruneSettings(taus=(0.2, 0.4), seeds=(3,), max_prompts=2, pool="active", magnitude_bins=10)
    assert PruneSettings.from_dict(asdict(s)) == s
    # added later: hashed only when set, so existing prune ids stay
    assert "magnitude_bins" not in PruneSettings().hashed() and PruneSettings(magnitude_bins=10).hashed()["magnitude_bins"] == 10
    for bad in ({"block_size": 0}, {"pool": "all"}, {"seeds": (1, 1)}, {"taus": ()}, {"magnitude_bins": 0},
                {"tau_search": "up"}, {"refine": True}):
        with pytest.raises(UsageError):
            PruneSettings(**bad)


def test_cli_runs_the_three_stages(planted, stage1, tmp_path):
    runner = CliRunner()
    common = ["--model", str(planted.model_dir), "--judge", "p_i"]
    Store.create(tmp_path / "empty")
    res = runner.invoke(app, ["analyze", "prune", *common, "--store", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "error: no candidates analysis" in res.stderr
    common += ["--store", str(stage1[0].path)]                  # the fixture's store: its runs are cache hits
    res = runner.invoke(app, ["analyze", "direction", "--harmful", str(planted.harmful), "--harmless",
                              str(planted.benign), "--n-train", "40", "--n-val", "8", "--n-random", "2", *common])
    assert res.exit_code == 0, res.output
    assert "l* = 2" in res.stdout
    res = runner.invoke(app, ["analyze", "candidates", "--dataset", str(planted.harmful), "--split", "train",
                              "--n-prompts", "4", "--ks", "10,20", *common,
                              *[a for spec in planted.sae_specs for a in ("--sae", spec)]])
    assert res.exit_code == 0, res.output
    assert "4 of 4 refused prompts (4 taken) jailbroken" in res.stdout
    res = runner.invoke(app, ["analyze", "prune", "--taus", "0.5", "--seeds", "0,1", *common])
    assert res.exit_code == 0, res.output
    assert "4/4 prompts jailbroken by their minimal sets" in res.stdout
    assert "random active features of equal size 0% [0%, 49%] (0/4), McNemar p = 0.12" in res.stdout


def test_prune_refuses_another_position_0_rule_than_the_stage_1_it_starts_from(stage1):
    store, model = stage1                                 # the fixture's stage 1 ablated position 0 (the default)
    with pytest.raises(UsageError, match="ablated with position 0, so prune must too"):
        prune.run(store, model, PruneSettings(judge="p_i", ablate_first=False))
