"""Controls on the planted model: O'Brien et al. sets match a dense count, ASR per k follows the planted latents.

The planted latents (layer 2) fire on every token from a prompt's first trigger word on, 16-19 of its
user + post_instruction tokens; the other latents fire on at most 12. So ablating the features active on
>= k tokens jailbreaks a prompt exactly when k <= the planted latents' token count there: ASR 1 at
small k, 0 at large k, and in between the share that the dense count predicts.
"""

import json
from dataclasses import asdict

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from analyze import controls, prune, report
from analyze.controls import ControlsSettings
from analyze.prune import PruneSettings
from cli import app
from extract.interventions import Intervention
from queries.tensors import sae_codes
from store import Store, UsageError
from tests.planted import (D_SAE, PLANTED_FEATURES, PLANTED_LAYER, SAE_LAYERS)

KS = (1, 2, 3, 4, 5, 8, 12, 16, 17, 18, 20, 64)
PROMPT_ROLES = ("user", "post_instruction")


@pytest.fixture(scope="module")
def stage2(planted_stage1):
    """A store with direction, candidates and a small prune analysis (judged on P("I")), and the run ids it holds."""
    store, model = planted_stage1
    pruned = prune.run(store, model, PruneSettings(judge="p_i", taus=(0.5,), seeds=(0,)))
    return store, model, pruned, set(store.sql("SELECT run_id FROM runs")["run_id"])


@pytest.fixture(scope="module")
def result(stage2):
    store, model, _, _ = stage2
    return controls.run(store, model, ControlsSettings(ks=KS))


def dense_token_counts(store, run_id: str, roles) -> dict[str, torch.Tensor]:
    """prompt_id -> [n_layers, d_sae] tokens of `roles` where each latent is > 0, from dense codes."""
    rows = store.sql("SELECT run_id, row, prompt_id, role FROM tokens WHERE run_id = ? ORDER BY row", [run_id])
    codes = torch.stack([sae_codes(store, rows, layer, D_SAE) for layer in SAE_LAYERS])   # [n_layers, n_rows, d_sae]
    out = {}
    for prompt_id in rows["prompt_id"].unique():
        mask = torch.from_numpy(((rows["prompt_id"] == prompt_id) & rows["role"].is_in(list(roles))).to_numpy())
        out[prompt_id] = (codes[:, mask] > 0).sum(dim=1)                                  # [n_layers, d_sae]
    return out


def oracle_set(counts: torch.Tensor, k: int) -> set[tuple[int, int]]:
    layer_idx, feature = torch.nonzero(counts >= k, as_tuple=True)
    return {(SAE_LAYERS[i], int(f)) for i, f in zip(layer_idx.tolist(), feature.tolist())}


def ablated_sets(store, run_id: str) -> dict[int, set[tuple[int, int]]]:
    """item -> the (layer, feature) pairs its intervention spec zero-ablates."""
    df = store.sql("SELECT i.item, s.spec FROM items i JOIN interventions s USING (spec_hash) WHERE i.run_id = ?", [run_id])
    out = {}
    for item, spec in df.iter_rows():
        parsed = Intervention.from_dict(json.loads(spec))
        out[item] = {(layer, f) for layer, fs in parsed.zero_ablate.items() for f in fs}
    return out


def test_counts_and_ablated_sets_match_a_dense_count_of_the_prompt_tokens(stage2, result):
    store = stage2[0]
    counts = dense_token_counts(store, result.activation_run_id, PROMPT_ROLES)
    rows = store.sql("SELECT * FROM control_results WHERE controls_id = ? AND kind = 'obrien'", [result.controls_id])
    assert rows.height == len(KS) * 4
    for k in KS:
        at_k = rows.filter(pl.col("k") == k)
        specs = ablated_sets(store, at_k["run_id"][0])
        for prompt_id, n_features, item in at_k.select("prompt_id", "n_features", "item").iter_rows():
            expected = oracle_set(counts[prompt_id], k)
            assert n_features == len(expected), (k, prompt_id)
            assert specs[item] == expected, (k, prompt_id)
    assert rows.filter(pl.col("k") == 1)["n_features"].min() > rows.filter(pl.col("k") == 8)["n_features"].max() > 3
    # the template tokens before the instruction are not counted, and counting them would change the sets
    everything = dense_token_counts(store, result.activation_run_id, ("first", "template", *PROMPT_ROLES))
    assert any(oracle_set(everything[p], k) != oracle_set(counts[p], k) for p in counts for k in KS)


def test_asr_per_k_follows_the_planted_latents(stage2, result):
    store = stage2[0]
    counts = dense_token_counts(store, result.activation_run_id, PROMPT_ROLES)
    planted_tokens = {p: int(c[SAE_LAYERS.index(PLANTED_LAYER), list(PLANTED_FEATURES)].min()) for p, c in counts.items()}
    others = {p: int(c.flatten().sort().values[-len(PLANTED_FEATURES) - 1]) for p, c in counts.items()}
    assert all(planted_tokens[p] > max(8, others[p]) for p in counts)     # the most frequent latents on every prompt
    asr = store.sql("SELECT * FROM control_asr WHERE controls_id = ? AND kind = 'obrien' ORDER BY k", [result.controls_id])
    assert asr["k"].to_list() == list(KS) and asr["n_prompts"].to_list() == [4] * len(KS)
    expected = [sum(n >= k for n in planted_tokens.values()) for k in KS]
    assert asr["n_jailbroken"].to_list() == expected
    assert asr["asr"].to_list() == pytest.approx([n / 4 for n in expected])
    assert expected[:KS.index(8) + 1] == [4] * (KS.index(8) + 1) and expected[-2:] == [0, 0]
    assert any(0 < n < 4 for n in expected)                               # prompts differ in where they flip
    per_prompt = store.sql("SELECT prompt_id, k, jailbroken FROM control_results WHERE controls_id = ? "
                           "AND kind = 'obrien'", [result.controls_id])
    for prompt_id, k, jailbroken in per_prompt.iter_rows():
        assert jailbroken == (k <= planted_tokens[prompt_id]), (prompt_id, k)
    clean = store.sql("SELECT * FROM control_results WHERE controls_id = ? AND kind = 'clean'", [result.controls_id])
    assert clean["refused_clean"].all() and not clean["jailbroken"].any() and (clean["n_features"] == 0).all()
    assert result.summary["n_refused"] == 4 and result.summary["max_asr"] == 1.0


def test_random_control_is_read_from_set_checks(stage2, result):
    store, _, pruned, _ = stage2
    checks = store.sql("SELECT * FROM set_checks WHERE set_id = ? AND selected", [pruned.prune_id])
    for kind, name in (("random", "random"), ("set", "stage2")):
        mine = store.sql("SELECT * FROM control_asr WHERE controls_id = ? AND kind = ?", [result.controls_id, name])
        theirs = checks.filter(pl.col("kind") == kind)
        assert mine.height == 1 and mine["k"][0] is None
        assert mine["n_prompts"][0] == theirs.height == 4
        assert mine["n_jailbroken"][0] == theirs["jailbroken"].sum()
        assert mine["mean_features"][0] == pytest.approx(theirs["n_features"].mean())
    assert result.summary["random"]["n_jailbroken"] == 0 and result.summary["stage2"]["n_jailbroken"] == 4
    runs = set(store.sql("SELECT run_id FROM control_results WHERE controls_id = ?", [result.controls_id])["run_id"])
    assert not runs & set(checks["run_id"])                      # nothing of prune's checks was run again


def test_store_is_the_cache(stage2, result):
    store, model, _, before = stage2
    assert result.activation_run_id in before                    # prune's clean run, not a new one
    n_runs = store.sql("SELECT count(*) AS n FROM runs")["n"][0]
    again = controls.run(store, model, ControlsSettings(ks=KS))
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == n_runs
    assert again.controls_id == result.controls_id and again.asr.equals(result.asr)
    assert store.sql("SELECT count(*) AS n FROM control_results WHERE controls_id = ?",
                     [result.controls_id])["n"][0] == (len(KS) + 2) * 4      # clean, each k, obrien_size
    fewer = controls.run(store, model, ControlsSettings(ks=(1, 64), max_prompts=2))
    assert fewer.activation_run_id == result.activation_run_id and fewer.summary["n_prompts"] == 2
    assert [r["asr"] for r in fewer.summary["per_k"]] == [1.0, 0.0]


def test_report_section(stage2, result, tmp_path):
    rendered = report.run(stage2[0], report.ReportSettings(out=str(tmp_path / "r")))
    status = dict(rendered.sections)
    assert status["Controls: O'Brien et al. baseline (features active on >= k tokens)"] == "ok"
    html = rendered.html.read_text()
    assert "O&#x27;Brien ASR by k" in html and "FROM control_asr" in html


def test_settings_round_trip_and_validation():
    s = ControlsSettings(ks=(2, 4), roles=("user",), max_prompts=3, judge="p_i@0.3", generate=16, population="stage2")
    assert ControlsSettings.from_dict(json.loads(json.dumps(asdict(s)))) == s
    assert ControlsSettings.from_dict(asdict(ControlsSettings())) == ControlsSettings()
    for bad in ({"ks": ()}, {"ks": (0, 1)}, {"ks": (3, 2)}, {"roles": ("assistant",)}, {"judge": "vibes"},
                {"max_prompts": 0}, {"batch_size": 0}):
        with pytest.raises(UsageError):
            ControlsSettings(**bad)
    with pytest.raises(UsageError, match="unknown setting"):
        ControlsSettings.from_dict({"k": 3})


def test_cli(planted, stage2, tmp_path):
    runner = CliRunner()
    Store.create(tmp_path / "empty")
    res = runner.invoke(app, ["analyze", "controls", "--model", str(planted.model_dir), "--store", str(tmp_path / "empty")])
    assert res.exit_code == 2 and res.stdout == ""
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [res.stderr.splitlines()[-1]] == [
        f"error: no prune analysis for {planted.model_dir} in {tmp_path / 'empty'}; run "
        f"`python cli.py analyze prune --model {planted.model_dir} --store {tmp_path / 'empty'}` first"]
    res = runner.invoke(app, ["analyze", "controls", "--model", str(planted.model_dir), "--ks", "1,x",
                              "--store", str(stage2[0].path)])
    assert res.exit_code == 2 and res.stderr.strip() == "error: --ks must be a comma-separated list of integers, got 'x'"
    res = runner.invoke(app, ["analyze", "controls", "--model", str(planted.model_dir), "--ks", "1,64",
                              "--store", str(stage2[0].path)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "4 evaluation prompts, 4 refused without intervention" in lines[1]
    assert lines[4].split()[0] == "1" and lines[4].split()[2:] == ["1.00", "100%", "[51%,", "100%]", "(4/4)"]
    assert lines[5].split()[0] == "64" and lines[5].split()[1:] == ["0.0", "0.00", "0%", "[0%,", "49%]", "(0/4)"]
    random = next(line for line in lines if line.startswith("random control (as many active features)"))
    assert random.startswith("random control (as many active features): ASR 0.00 0% [0%, 49%] (0/4)")
    assert random.endswith("stage 2 minus this +100 pp [+31, +100], McNemar p = 0.12 (4 vs 0 discordant of 4)")


def test_obrien_at_the_stage2_size_and_paired_tests(stage2, result):
    store, _, pruned, _ = stage2
    sizes = store.sql("SELECT prompt_id, count(*) AS n FROM feature_sets WHERE set_id = ? AND stage = 2 AND selected "
                      "GROUP BY prompt_id", [pruned.prune_id])
    rows = store.sql("SELECT * FROM control_results WHERE controls_id = ? AND kind = 'obrien_size'", [result.controls_id])
    assert dict(rows.select("prompt_id", "n_features").iter_rows()) == dict(sizes.iter_rows())
    counts = dense_token_counts(store, result.activation_run_id, PROMPT_ROLES)
    for prompt_id, item, run_id in rows.select("prompt_id", "item", "run_id").iter_rows():
        ablated = ablated_sets(store, run_id)[item]
        c = counts[prompt_id]
        # every ablated feature is counted on at least as many tokens as every feature left out
        lowest = min(int(c[SAE_LAYERS.index(l), f]) for l, f in ablated)
        left = [int(c[i, f]) for i, l in enumerate(SAE_LAYERS) for f in range(D_SAE) if (l, f) not in ablated]
        assert lowest >= max(left) and {(PLANTED_LAYER, f) for f in PLANTED_FEATURES} <= ablated
    asr = store.sql("SELECT * FROM control_asr WHERE controls_id = ? AND kind = 'obrien_size'", [result.controls_id])
    assert asr["n_jailbroken"].to_list() == [4] and asr["ci_low"][0] == pytest.approx(0.5101, abs=1e-4)
    tests = store.sql("SELECT * FROM paired_tests WHERE analysis_id = ? ORDER BY b", [result.controls_id])
    assert tests["b"].to_list() == ["obrien_size", "random", "random_magnitude"]
    # the stage-2 sets and the size-matched O'Brien sets both hold the planted latents: no discordant prompt
    assert tests.row(0, named=True) | {} == {**tests.row(0, named=True), "n_both": 4, "n_a_only": 0, "p_value": 1.0}
    assert tests["n_a_only"].to_list()[1:] == [4, 4] and tests["p_value"].to_list()[1:] == pytest.approx([0.125] * 2)
    assert result.summary["matched_k"]["k"] in KS


def test_obrien_runs_on_the_refused_population_not_only_what_stage1_broke(stage2):
    store, model, _, _ = stage2
    two = prune.run(store, model, PruneSettings(judge="p_i", taus=(0.5,), seeds=(0,), max_prompts=2))
    refused = controls.run(store, model, ControlsSettings(ks=(1, 64), prune_id=two.prune_id))
    narrow = controls.run(store, model, ControlsSettings(ks=(1, 64), prune_id=two.prune_id, population="stage2"))
    candidates = store.sql("SELECT DISTINCT prompt_id FROM candidate_sets WHERE candidates_id = ? AND k = 0",
                           [two.candidates_id])["prompt_id"]
    clean = refused.results.filter(pl.col("kind") == "clean")
    assert sorted(clean["prompt_id"]) == sorted(candidates) and len(candidates) == 4
    assert refused.summary["n_refused"] == 4 and refused.summary["n_stage2_prompts"] == 2
    assert [r["n_prompts"] for r in refused.summary["per_k"]] == [4, 4]
    assert [r["n_jailbroken"] for r in refused.summary["per_k"]] == [4, 0]
    assert narrow.summary["n_refused"] == 2 and [r["n_prompts"] for r in narrow.summary["per_k"]] == [2, 2]
    assert refused.controls_id != narrow.controls_id
    # the size-matched O'Brien sets exist only where there is a stage-2 set to match
    assert refused.results.filter(pl.col("kind") == "obrien_size").height == 2
    with pytest.raises(UsageError, match="population must be one of refused, stage2"):
        ControlsSettings(population="all")


def assert_paired_on_the_prompts_counted(store, controls_id: str) -> None:
    """Every paired test of the controls analysis is over exactly the prompts its two ASR rows count."""
    counted = dict(store.sql("SELECT kind, n_prompts FROM control_asr WHERE controls_id = ? AND kind != 'obrien'",
                             [controls_id]).iter_rows())
    tests = store.sql("SELECT a, b, n_pairs FROM paired_tests WHERE analysis_id = ?", [controls_id])
    assert tests.height == 3
    for a, b, n_pairs in tests.iter_rows():
        assert n_pairs == counted[a] == counted[b], (a, b, n_pairs, counted)


def test_paired_tests_use_the_prompts_the_asr_rows_count(stage2, result):
    store, model, _, _ = stage2
    assert_paired_on_the_prompts_counted(store, result.controls_id)
    # max_prompts cuts the stage-2 and random rows to 2 of the 4 stage-2 prompts: the paired tests follow
    fewer = controls.run(store, model, ControlsSettings(ks=(1,), max_prompts=2))
    assert fewer.summary["stage2"]["n_prompts"] == 2
    assert_paired_on_the_prompts_counted(store, fewer.controls_id)


def test_obrien_size_counts_every_stage2_prompt_its_paired_test_pairs(stage2, result):
    store, _, pruned, _ = stage2
    ids = sorted(result.results["prompt_id"].unique())
    # one stage-2 prompt that this analysis' clean run did not call a refusal (e.g. another judge than prune's)
    results = result.results.with_columns(refused_clean=pl.col("refused_clean") & (pl.col("prompt_id") != ids[0]))
    asr = controls.obrien_asr(results)
    assert asr.filter(pl.col("kind") == "obrien_size")["n_prompts"].to_list() == [4]
    assert set(asr.filter(pl.col("kind") == "obrien")["n_prompts"]) == {3}     # the per-k rows: refused clean only
    tests = {b: p for _, b, _, p in controls.paired_tests(store, pruned.prune_id, results, ids)}
    assert tests["obrien_size"].n == 4


def test_later_stages_ablate_position_0_as_the_prune_analysis_found_the_sets(planted_stage1):
    # a prune analysis with --no-ablate-first (pool "active" measures its own base): the controls ablate every
    # set, their baselines included, without position 0 as well; the default rule is inherited as True
    from analyze import catalog

    store, model = planted_stage1
    pruned = prune.run(store, model, PruneSettings(judge="p_i", taus=(0.5,), seeds=(0,), pool="active",
                                                   ablate_first=False))
    assert catalog.ablates_first(store, pruned.prune_id) is False
    assert catalog.ablates_first(store, None) is True
    result = controls.run(store, model, ControlsSettings(ks=(1,), prune_id=pruned.prune_id))
    run_ids = store.sql("SELECT DISTINCT run_id FROM control_results WHERE controls_id = ? AND kind != 'clean'",
                        [result.controls_id])["run_id"].to_list()
    specs = store.sql("SELECT DISTINCT s.spec FROM items i JOIN interventions s USING (spec_hash) "
                      "WHERE list_contains(?, i.run_id)", [run_ids])["spec"].to_list()
    ablating = [Intervention.from_dict(json.loads(s)) for s in specs]
    ablating = [s for s in ablating if s.zero_ablate]
    assert ablating and all(s.zero_ablate_first is False for s in ablating)
