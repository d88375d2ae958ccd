"""Gradient attribution on the planted model: the planted latents first, predictions that match real ablations."""

from dataclasses import asdict

import numpy as np
import polars as pl
import pytest

from analyze import attribution
from analyze.attribution import AttributionSettings
from store import UsageError
from tests.planted import PLANTED_FEATURES, PLANTED_LAYER

PLANTED = {(PLANTED_LAYER, f) for f in PLANTED_FEATURES}


@pytest.fixture(scope="module")
def attributed(planted_stage1):
    store, model = planted_stage1
    return attribution.run(store, model, AttributionSettings(n_single=4, n_blocks=2))


def test_planted_latents_rank_first_on_every_prompt(planted_stage1, attributed):
    scores = attributed.scores
    assert scores.height and set(scores["prompt_id"]) == set(attributed.checks["prompt_id"])
    for (pid,), part in scores.group_by(["prompt_id"]):
        top = part.sort("score").head(3)
        assert set(zip(top["layer"], top["feature"])) == PLANTED, pid
        assert (top["score"] < 0).all()


def test_settings_round_trip_and_validation():
    s = AttributionSettings(metric="logit_diff", steps=4)
    assert AttributionSettings.from_dict(asdict(s)) == s and s.method == "ig"
    with pytest.raises(UsageError, match="metric must be one of"):
        AttributionSettings(metric="kl")
    with pytest.raises(UsageError, match="steps must be >= 1"):
        AttributionSettings(steps=0)


def test_prediction_equals_the_measured_effect_where_the_model_is_linear(planted_stage1, linear_model):
    """With the final RMSNorm replaced by a fixed scale, the "I" logits are linear in the planted latents and the
    logit difference to the top other token is exactly linear in them: prediction == real ablation (float16 logits)."""
    store, _ = planted_stage1
    cid = store.sql("SELECT analysis_id FROM analyses WHERE kind = 'candidates'").item()
    result = attribution.run(store, linear_model, AttributionSettings(candidates_id=cid, metric="logit_diff",
                                                                     n_single=6, n_blocks=2))
    planted_singles = result.checks.filter((pl.col("kind") == "single") & (pl.col("layer") == PLANTED_LAYER)
                                           & pl.col("features").list.first().is_in(list(PLANTED_FEATURES)))
    assert planted_singles.height == 3 * result.metrics["n_prompts"]
    predicted, measured = planted_singles["predicted_delta"].to_numpy(), planted_singles["measured_delta"].to_numpy()
    assert (predicted < -0.05).all()
    np.testing.assert_allclose(predicted, measured, rtol=1e-3, atol=1e-4)     # float16 logits in the store
    overall = result.correlations.filter(pl.col("layer").is_null() & (pl.col("kind") == "all")
                                         & (pl.col("quantity") == "metric"))
    assert overall["pearson"].item() > 0.999


def test_integrated_gradients_with_one_step_is_attribution_patching(planted, planted_stage1, attributed):
    store, model = planted_stage1
    from extract.gradients import GradientSettings, attributions
    from analyze.common import load_saes, stored_prompts

    prompts = stored_prompts(store, sorted(set(attributed.scores["prompt_id"]))[:2])
    saes = load_saes(store, model, planted.sae_specs)
    one = attributions(model, prompts, saes, GradientSettings(steps=1)).scores
    ig = attributions(model, prompts, saes, GradientSettings(steps=4)).scores
    assert one.select("prompt_id", "layer", "feature").equals(ig.select("prompt_id", "layer", "feature"))
    stored = attributed.scores.filter(pl.col("prompt_id").is_in([p.prompt_id for p in prompts])).sort(
        "prompt_id", "layer", "feature")
    np.testing.assert_allclose(one["score"].to_numpy(), stored["score"].to_numpy(), rtol=1e-6)
    # the RMSNorm makes the planted latents' effect concave: IG along the joint path predicts a larger drop
    planted = pl.col("feature").is_in(list(PLANTED_FEATURES)) & (pl.col("layer") == PLANTED_LAYER)
    assert (ig.filter(planted)["score"].to_numpy() < one.filter(planted)["score"].to_numpy()).all()


def test_stage1_ranked_by_attribution_puts_the_planted_latents_first(planted, planted_stage1, attributed):
    from analyze import candidates
    from tests.planted import candidate_settings

    store, model = planted_stage1
    result = candidates.run(store, model, candidate_settings(planted, ks=(1, 2, 3, 4), rank="attribution",
                                                             attribution_id=attributed.attribution_id))
    assert result.metrics["rank"] == "attribution" and result.metrics["n_jailbroken"] == result.metrics["n_refused"]
    cosine = candidates.run(store, model, candidate_settings(planted, ks=(1, 2, 3, 4)))
    assert result.prompts["k"].to_list() == cosine.prompts["k"].to_list()         # both find the planted first
    top = result.ranking.filter((pl.col("layer") == PLANTED_LAYER) & (pl.col("rank") < 3))
    for (pid,), part in top.group_by(["prompt_id"]):
        assert set(part["feature"]) == set(PLANTED_FEATURES), pid
    hashed = candidate_settings(planted).hashed()                             # cosine runs keep their ids
    assert "rank" not in hashed and "attribution_id" not in hashed
    assert candidate_settings(planted, rank="attribution").hashed()["rank"] == "attribution"


@pytest.fixture(scope="module")
def paper_order(planted_stage1):
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    return prune.run(store, model, PruneSettings(judge="p_i", candidates_id=_cosine_candidates(store)))


def _cosine_candidates(store) -> str:
    """The fixture's stage-1 analysis: cosine ranking, K = 10, 20."""
    return store.sql("SELECT analysis_id FROM analyses WHERE kind = 'candidates' AND settings->>'rank' = 'cosine' "
                     "AND json_array_length(settings->'ks') = 2").item()


def _sets(store, prune_id: str) -> dict:
    df = store.sql("SELECT prompt_id, tau, layer, feature FROM feature_sets WHERE set_id = ? AND stage = 2", [prune_id])
    sets: dict = {}
    for prompt_id, tau, layer, feature in df.iter_rows():
        sets.setdefault((prompt_id, round(tau, 3)), set()).add((layer, feature))
    return sets


def test_bisection_recovers_exactly_the_planted_set_with_fewer_evaluations(planted_stage1, attributed, paper_order):
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    result = prune.run(store, model, PruneSettings(judge="p_i", order="bisect", candidates_id=_cosine_candidates(store),
                                                   attribution_id=attributed.attribution_id))
    sets = _sets(store, result.prune_id)
    assert len(sets) == 4 * 8 and all(s == PLANTED for s in sets.values())
    assert result.summary["n_jailbroken"] == 4 and result.summary["order"] == "bisect"
    assert all(s >= PLANTED for s in _sets(store, paper_order.prune_id).values())
    assert result.summary["n_evaluations"] * 2 < paper_order.summary["n_evaluations"]
    assert result.summary["n_forward_items"] < paper_order.summary["n_forward_items"]
    steps = store.sql("SELECT * FROM pruning_steps WHERE prune_id = ?", [result.prune_id])
    assert steps.height == result.summary["n_evaluations"]


def test_the_drifting_base_also_recovers_exactly_the_planted_set(planted_stage1, attributed, paper_order):
    # restoring a planted latent raises P("I") far above tau of any base, restoring another one barely moves it:
    # the base Algorithm 1 drifts to (last_pass) keeps the same set here, under its own analysis id
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    common = dict(judge="p_i", order="bisect", candidates_id=_cosine_candidates(store),
                  attribution_id=attributed.attribution_id)
    pool = prune.run(store, model, PruneSettings(**common))
    drift = prune.run(store, model, PruneSettings(**common, bisect_base="last_pass"))
    assert drift.prune_id != pool.prune_id and drift.summary["bisect_base"] == "last_pass"
    assert all(s == PLANTED for s in _sets(store, drift.prune_id).values())
    assert drift.summary["n_evaluations"] * 2 < paper_order.summary["n_evaluations"]
    def n_bases(prune_id):      # distinct base values per (prompt, tau) search
        return store.sql("SELECT count(DISTINCT p_base) AS n FROM pruning_steps WHERE prune_id = ? "
                         "GROUP BY prompt_id, tau", [prune_id])["n"].to_list()
    assert set(n_bases(pool.prune_id)) == {1}         # always P(C)
    assert max(n_bases(drift.prune_id)) > 1           # the base moved to the passing prefix's P("I")
    from analyze.attribution_report import order_comparison
    labels = dict(order_comparison(store).select("prune_id", "order").iter_rows())
    assert labels[drift.prune_id] == "bisect (last_pass)" and labels[pool.prune_id] == "bisect"


def test_planted_model_keeps_the_planted_latents_in_one_block_with_fewer_evaluations(planted_stage1, attributed,
                                                                                      paper_order):
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    result = prune.run(store, model, PruneSettings(judge="p_i", order="gallop", candidates_id=_cosine_candidates(store),
                                                   attribution_id=attributed.attribution_id))
    sets = _sets(store, result.prune_id)
    assert len(sets) == 4 * 8 and all(PLANTED <= s and len(s) == 5 for s in sets.values())
    assert result.summary["n_jailbroken"] == 4 and result.summary["order"] == "gallop"
    assert result.summary["n_evaluations"] * 2 < paper_order.summary["n_evaluations"]


def _selected(store, prune_id: str) -> dict:
    rows = store.sql("SELECT prompt_id, tau, layer, feature FROM feature_sets WHERE set_id = ? AND stage = 2 "
                     "AND selected", [prune_id])
    sets: dict = {}
    for prompt_id, tau, layer, feature in rows.iter_rows():
        sets.setdefault(prompt_id, (round(tau, 3), set()))[1].add((layer, feature))
    return sets


def _guided(planted_stage1, attributed, order: str = "gallop", judge: str = "p_i", **extra):
    """prune.run on the fixture's cosine stage 1 in an attribution-guided order."""
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    return prune.run(store, model, PruneSettings(judge=judge, order=order, candidates_id=_cosine_candidates(store),
                                                 attribution_id=attributed.attribution_id, **extra))


def test_descending_taus_select_the_sweeps_sets_with_fewer_evaluations_and_judged_sets(planted_stage1, attributed):
    from analyze.prune import PruneSettings

    store, _ = planted_stage1
    sweep = _guided(planted_stage1, attributed)
    down = _guided(planted_stage1, attributed, tau_search="descending")
    assert down.prune_id != sweep.prune_id and down.summary["tau_search"] == "descending"
    assert "tau_search" not in PruneSettings().hashed() and "refine" not in PruneSettings().hashed()
    assert _selected(store, down.prune_id) == _selected(store, sweep.prune_id)
    assert down.summary["n_jailbroken"] == sweep.summary["n_jailbroken"] == 4
    # every prompt breaks at the largest tau: one tau searched and judged instead of eight
    assert sweep.summary["n_judged_sets"] == 4 * 8 and down.summary["n_judged_sets"] == 4
    assert down.summary["n_evaluations"] * 4 < sweep.summary["n_evaluations"]
    assert down.summary["n_forward_items"] <= sweep.summary["n_forward_items"]
    assert down.per_tau["tau"].to_list() == [0.8]


def test_descending_reads_a_later_taus_repeated_tests_from_the_earlier_ones(planted_stage1, attributed):
    # tau 1e9: every chunk passes, the set is empty and refuses, so the prompt goes on to tau 0.8, whose search
    # starts with the same test: read from tau 1e9's run, not run again
    store, _ = planted_stage1
    sweep = _guided(planted_stage1, attributed, taus=(1e9, 0.8), seeds=(0,))
    down = _guided(planted_stage1, attributed, taus=(1e9, 0.8), seeds=(0,), tau_search="descending")
    assert _selected(store, down.prune_id) == _selected(store, sweep.prune_id)
    assert {tau for tau, _ in _selected(store, down.prune_id).values()} == {0.8}
    steps = store.sql("SELECT tau, step, run_id, item, p_without FROM pruning_steps WHERE prune_id = ? ORDER BY ALL",
                      [down.prune_id])
    first = {round(t, 3): rows for (t,), rows in steps.filter(pl.col("step") == 0).group_by(["tau"])}
    assert first[0.8].select("run_id", "item", "p_without").sort("item").equals(
        first[1e9].select("run_id", "item", "p_without").sort("item"))
    assert down.summary["n_forward_items"] < down.summary["n_evaluations"]
    assert down.summary["n_forward_items"] <= sweep.summary["n_forward_items"]


@pytest.mark.parametrize("order", ["gallop", "attribution"])
def test_refinement_sheds_the_passengers_and_leaves_exactly_the_planted_set(planted_stage1, attributed, paper_order,
                                                                           order):
    store, _ = planted_stage1
    plain = _guided(planted_stage1, attributed, order, tau_search="descending")
    refined = _guided(planted_stage1, attributed, order, tau_search="descending", refine=True)
    before, after = _selected(store, plain.prune_id), _selected(store, refined.prune_id)
    assert all(s > PLANTED for _, s in before.values())
    assert all(s == PLANTED for _, s in after.values()) and len(after) == 4
    assert {p: t for p, (t, _) in after.items()} == {p: t for p, (t, _) in before.items()}
    assert refined.summary["refine"]["n_refined"] == refined.summary["refine"]["n_refined_kept"] == 4
    assert refined.summary["refine"]["sizes_after"] == [3, 3, 3, 3]
    assert refined.summary["n_jailbroken"] == 4
    assert refined.summary["n_evaluations"] == plain.summary["n_evaluations"] + refined.summary["refine"]["refine_evaluations"]
    checks = store.sql("SELECT kind, n_features, selected FROM set_checks WHERE set_id = ? AND kind IN "
                       "('set', 'unrefined', 'refined') AND tau > 0.79", [refined.prune_id])
    assert sorted(checks.filter(pl.col("kind") == "unrefined")["n_features"].to_list()) == sorted(
        len(s) for _, s in before.values())
    assert not checks.filter(pl.col("kind") != "set")["selected"].any()
    from analyze.attribution_report import order_comparison
    labels = dict(order_comparison(store).select("prune_id", "order").iter_rows())
    assert labels[refined.prune_id] == f"{order}, descending, refined" and labels[plain.prune_id] == f"{order}, descending"
    # the refinement's rows continue each search, one feature per block
    steps = store.sql("SELECT prompt_id, seed, step, len(block_features) AS n FROM pruning_steps WHERE prune_id = ? "
                      "AND tau > 0.79 ORDER BY prompt_id, step", [refined.prune_id])
    for _, run in steps.group_by(["prompt_id", "seed"]):
        assert run["step"].is_unique().all()
    for _, run in steps.group_by(["prompt_id"]):
        ones = run.filter(pl.col("step") > run.filter(pl.col("n") > 1)["step"].max())
        assert ones.height >= 3 and (ones["n"] == 1).all()


def test_a_refinement_that_no_longer_jailbreaks_is_tried_again_at_the_next_smaller_tolerance(planted_stage1,
                                                                                            attributed):
    # tau 20 keeps the planted block of 5 (P("I") 0.004: jailbroken under p_i@0.03); refined at tolerance 20 it
    # loses a planted latent (P("I") about 0.06: refused), so the ladder refines again at 0.8: the planted 3
    store, _ = planted_stage1
    result = _guided(planted_stage1, attributed, judge="p_i@0.03", taus=(20.0, 0.8), tau_search="descending",
                     refine=True)
    refine = result.summary["refine"]
    assert refine["n_refined"] == refine["n_refined_kept"] == 4 and refine["n_attempts"] == 8
    assert refine["tolerances"] == [0.8] * 4 and refine["sizes_before"] == [5] * 4 and refine["sizes_after"] == [3] * 4
    assert all(tau == 20.0 and s == PLANTED for tau, s in _selected(store, result.prune_id).values())
    checks = store.sql("SELECT kind, n_features, jailbroken, selected FROM set_checks WHERE set_id = ? AND kind IN "
                       "('set', 'unrefined', 'refined')", [result.prune_id])
    rejected = checks.filter(pl.col("kind") == "refined")
    assert rejected.height == 4 and (rejected["n_features"] < 3).all() and not rejected["jailbroken"].any()
    assert checks.filter(pl.col("selected"))["n_features"].to_list() == [3] * 4
    steps = store.sql("SELECT prompt_id, tau, step, p_base, delta, decision FROM pruning_steps WHERE prune_id = ? "
                      "AND len(block_features) = 1 ORDER BY prompt_id, step", [result.prune_id])
    assert set(steps["tau"].to_list()) == {20.0}            # both attempts continue the tau-20 search's rows
    for _, run in steps.group_by(["prompt_id"]):
        assert run["step"].is_unique().all() and run["p_base"].n_unique() == 1    # fixed base: P(K)
        assert run.filter(pl.col("decision") == "prune")["delta"].max() < 20.0


def test_attribution_order_tests_the_planted_latents_last_in_one_block(planted_stage1, attributed):
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    result = prune.run(store, model, PruneSettings(judge="p_i", order="attribution",
                                                   candidates_id=_cosine_candidates(store),
                                                   attribution_id=attributed.attribution_id))
    steps = store.sql("SELECT prompt_id, tau, seed, step, block_layers, block_features, decision FROM pruning_steps "
                      "WHERE prune_id = ? ORDER BY ALL", [result.prune_id])
    for _, run in steps.group_by(["prompt_id", "tau", "seed"]):
        last = run.sort("step").tail(1)
        assert PLANTED <= set(zip(last["block_layers"][0], last["block_features"][0]))
        assert run.filter(pl.col("decision") == "keep").height == 1
    # one block of 5 under every seed: the seeds no longer thin the set out (the paper order's intersection
    # over 3 random orders is smaller here), but no planted latent is ever pruned
    assert {len(s) for s in _sets(store, result.prune_id).values()} == {5}
    assert result.summary["n_jailbroken"] == 4


def test_orders_other_than_random_need_an_attribution_analysis(planted_stage1):
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    with pytest.raises(UsageError, match="no attribution analysis 0000 in"):
        prune.run(store, model, PruneSettings(judge="p_i", order="bisect", attribution_id="0000"))
    with pytest.raises(UsageError, match="order must be one of random, attribution, bisect"):
        PruneSettings(order="greedy")


def test_cli_rejects_a_bad_metric_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from tests.conftest import assert_one_error

    result = CliRunner().invoke(app, ["analyze", "attribution", "--metric", "kl", "--store", str(tmp_path / "s")])
    assert_one_error(result, "error: metric must be one of log_p, logit_diff, got 'kl'")


def test_report_section_shows_the_checks_rankings_and_orders(planted_stage1, attributed, paper_order):
    from analyze import prune, report
    from analyze.attribution_report import order_comparison, rank_comparison
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    prune.run(store, model, PruneSettings(judge="p_i", order="bisect", candidates_id=_cosine_candidates(store),
                                          attribution_id=attributed.attribution_id))
    orders = order_comparison(store).filter(pl.col("prune_id").is_in([paper_order.prune_id]) |
                                            (pl.col("order") == "bisect"))
    by_order = {row["order"]: row for row in orders.iter_rows(named=True)}
    assert by_order["random"]["jaccard_vs_random"] == 1.0
    assert by_order["bisect"]["mean_set_size"] == 3.0 and 0 < by_order["bisect"]["jaccard_vs_random"] <= 1
    assert by_order["bisect"]["evaluations_per_prompt"] < by_order["random"]["evaluations_per_prompt"]
    assert "cosine" in set(rank_comparison(store)["rank"])
    section = next(s for s in report.SECTIONS if s.command == "python cli.py analyze attribution")
    rendered = report.render_section(store, section, report.ReportSettings())
    assert rendered.status == "ok", rendered.parts
    assert any(isinstance(p, report.Figure) for p in rendered.parts)


def test_an_order_read_from_the_newest_attribution_is_a_new_analysis_when_that_changes(planted_stage1, attributed):
    # with no --attribution id, the newest attribution analysis orders the blocks: its id is part of the prune id,
    # so a later attribution run never makes the same prune id stand for other scores
    from analyze import prune
    from analyze.prune import PruneSettings

    store, model = planted_stage1
    settings = PruneSettings(judge="p_i", order="bisect", candidates_id=_cosine_candidates(store))
    before = prune.run(store, model, settings)
    newer = attribution.run(store, model, AttributionSettings(n_single=2, n_blocks=1, steps=2))
    after = prune.run(store, model, settings)
    assert after.summary["attribution_id"] == newer.attribution_id != before.summary["attribution_id"]
    assert after.prune_id != before.prune_id
    assert store.sql("SELECT count(*) AS n FROM analyses WHERE analysis_id IN (?, ?)",
                     [before.prune_id, after.prune_id])["n"][0] == 2
