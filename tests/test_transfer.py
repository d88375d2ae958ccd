"""Transfer on a planted model: ablating a universal latent carries over to held-out prompts, a prompt-specific one not.

The store gets its direction, candidates and prune analyses written directly (the stages themselves are
tested elsewhere): one prune analysis found the universal latent (plus a noise latent on two prompts),
another the prompt-specific one, each a minimal set on the found prompts (tests/planted_transfer.py).
"""

import json
from dataclasses import asdict

import polars as pl
import pytest
from typer.testing import CliRunner

from analyze import transfer
from analyze.candidates import CandidateSettings
from analyze.catalog import save_analysis
from analyze.direction import DirectionSettings
from analyze.prune import PruneSettings
from analyze.transfer import TransferSettings, random_active, random_count, shared_core
from cli import app
from extract.datasets import load_prompts
from extract.models import load_model
from store import Store, UsageError
from tests.planted_transfer import C_U, D_MODEL, D_SAE, LAYER, SPECIFIC, UNIVERSAL, build_planted_transfer

NOISE = (11, 12)                     # layer-LAYER latents of the random kind


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted_transfer(tmp_path_factory.mktemp("planted"))


def _sets_frame(set_id: str, sets: dict[str, list[int]]) -> pl.DataFrame:
    rows = [{"set_id": set_id, "stage": 2, "prompt_id": p, "tau": 0.5, "layer": LAYER, "feature": f, "score": None,
             "selected": True} for p, fs in sets.items() for f in fs]
    return pl.DataFrame(rows, schema={"set_id": pl.String, "stage": pl.Int8, "prompt_id": pl.String,
                                      "tau": pl.Float32, "layer": pl.Int16, "feature": pl.Int32,
                                      "score": pl.Float32, "selected": pl.Boolean})


@pytest.fixture(scope="module")
def stored(planted, tmp_path_factory):
    """A store with a direction (C_U at LAYER), a candidates analysis and the two prune analyses."""
    store = Store.create(tmp_path_factory.mktemp("store") / "s")
    model = load_model(str(planted.model_dir))
    vector = [1.0 if i == C_U else 0.0 for i in range(D_MODEL)]
    save_analysis(store, "dir0", "direction", model.name, None, "p_i@0.5", DirectionSettings(judge="p_i"), {}, {})
    with store.transaction() as con:
        con.execute("INSERT INTO directions (direction_id, layer, vector, raw_norm, evaluated, selected) "
                    "VALUES ('dir0', ?, ?, 1.0, TRUE, TRUE)", [LAYER, vector])
    save_analysis(store, "cand0", "candidates", model.name, "dir0", "p_i@0.5",
                  CandidateSettings(saes=planted.sae_specs, judge="p_i"), {}, {})
    found = [p.prompt_id for p in load_prompts(str(planted.found))][:4]
    universal = {p: [UNIVERSAL, *NOISE[k:k + 1]] for k, p in enumerate(found)}     # noise on the first two
    save_analysis(store, "prune_universal", "prune", model.name, "cand0", "p_i@0.5", PruneSettings(judge="p_i"), {},
                  {"feature_sets": ("set_id", _sets_frame("prune_universal", universal))})
    save_analysis(store, "prune_specific", "prune", model.name, "cand0", "p_i@0.5", PruneSettings(judge="p_i"), {},
                  {"feature_sets": ("set_id", _sets_frame("prune_specific", {p: [SPECIFIC] for p in found}))})
    return store, model


SETTINGS = TransferSettings(split="all", limit=8, n_alpaca=3, batch_size=8)


def _rows(result) -> dict[str, dict]:
    return {(r["matched_to"] + "~" if r["matched_to"] else "") + r["intervention"]: r
            for r in result.table.iter_rows(named=True)}


def test_universal_latent_transfers(planted, stored):
    store, model = stored
    result = transfer.run(store, model, TransferSettings(**{**asdict(SETTINGS), "dataset": str(planted.held_out),
                                                            "prune_id": "prune_universal"}))
    rows = _rows(result)
    assert rows["none"]["n_prompts"] == rows["none"]["n_refused"] == 8 and rows["none"]["n_jailbroken"] == 0
    for name in ("direction", "union", "core"):
        assert (rows[name]["n_jailbroken"], rows[name]["n_refused"]) == (8, 8), name
        assert rows[name]["asr"] == 1.0 and rows[name]["ci_low"] == pytest.approx(0.676, abs=1e-3)
    assert rows["core"]["n_features"] == 1 and rows["union"]["n_features"] == 3          # U in 4/4, noise in 1/4 each
    for name in ("union~random_count", "union~random_active", "core~random_count", "core~random_active"):
        assert rows[name]["asr"] == 0.0 and rows[name]["n_features"] == rows[name.split("~")[0]]["n_features"], name
    assert "stage3" in result.skipped and "stage3" not in rows
    assert all(r["ce_alpaca"] is not None and r["alpaca_run_id"] for r in rows.values())
    stored_rows = store.sql("SELECT * FROM transfer_results WHERE transfer_id = ?", [result.transfer_id])
    assert stored_rows.height == len(rows) == 8
    kind = store.sql("SELECT kind, parent_id FROM analyses WHERE analysis_id = ?", [result.transfer_id]).row(0)
    assert kind == ("transfer", "prune_universal")
    assert transfer.summary_line(result) == (
        f"transfer to {planted.held_out} (all): refused 100% [68%, 100%] (8/8); ASR direction 100% [68%, 100%] (8/8), "
        "union 100% [68%, 100%] (8/8), core 100% [68%, 100%] (8/8) (prune prune_universal, judge p_i@0.5)")
    lines = transfer.detail_lines(result)
    assert lines[0].startswith("none             refused 100% [68%, 100%] (8/8)  CE ")
    assert lines[2].split()[:3] == ["union", "3", "features"] and "ASR 100% [68%, 100%] (8/8)  CE " in lines[2]
    assert lines[3].startswith("union~count") and "ASR 0% [0%, 32%] (0/8)" in lines[3]
    assert lines[-1].startswith("skipped stage3: no stage-3 sets on prune analysis prune_universal")
    again = transfer.run(store, model, TransferSettings(**{**asdict(SETTINGS), "dataset": str(planted.held_out),
                                                           "prune_id": "prune_universal"}))
    assert again.transfer_id == result.transfer_id and again.table.equals(result.table)


def test_prompt_specific_latent_does_not_transfer(planted, stored):
    store, model = stored
    held = transfer.run(store, model, TransferSettings(**{**asdict(SETTINGS), "dataset": str(planted.held_out),
                                                          "prune_id": "prune_specific"}))
    assert _rows(held)["union"]["n_features"] == 1 and _rows(held)["union"]["asr"] == 0.0
    assert _rows(held)["direction"]["asr"] == 1.0
    # on the prompts it was found on, the same ablation jailbreaks every one
    home = transfer.run(store, model, TransferSettings(**{**asdict(SETTINGS), "dataset": str(planted.found),
                                                          "prune_id": "prune_specific", "exclude_found": False}))
    assert _rows(home)["union"]["asr"] == 1.0 and _rows(home)["none"]["n_refused"] == 8
    with pytest.raises(UsageError, match="no held-out prompts"):
        _only_found(planted, store, model)


def _only_found(planted, store, model):
    """A prune analysis with a set on every found prompt leaves none held out."""
    everyone = {p.prompt_id: [SPECIFIC] for p in load_prompts(str(planted.found))}
    save_analysis(store, "prune_all", "prune", model.name, "cand0", "p_i@0.5", PruneSettings(judge="p_i"), {},
                  {"feature_sets": ("set_id", _sets_frame("prune_all", everyone))})
    return transfer.run(store, model, TransferSettings(dataset=str(planted.found), split="all", prune_id="prune_all",
                                                       n_alpaca=0))


def test_shared_core_and_random_controls():
    import numpy as np

    sets = [((2, 1), (2, 5)), ((2, 1),), ((2, 1), (3, 4)), ((2, 5),)]
    assert shared_core(sets, 0.5) == ((2, 1), (2, 5)) and shared_core(sets, 0.75) == ((2, 1),)
    features = ((2, 1), (2, 5), (3, 4))
    count = random_count(features, {2: D_SAE, 3: D_SAE}, np.random.default_rng(0))
    assert [l for l, _ in count] == [2, 2, 3] and not set(count) & set(features)
    magnitudes = {(2, f): float(f) for f in range(10)} | {(3, 4): 1.0}     # layer 2: 0..9 active, rank = value
    active = random_active(((2, 9), (2, 0), (3, 4), (3, 20)), magnitudes, {2: D_SAE, 3: D_SAE}, 5,
                           np.random.default_rng(0))
    assert len(active) == 4                                            # (3, 4) has no active peer: a silent one
    by_layer = sorted(active)
    assert by_layer[0][1] == 1 and by_layer[1][1] == 8                 # bins of two: {0, 1} and {8, 9}
    assert [l for l, _ in by_layer[2:]] == [3, 3] and not {f for _, f in by_layer[2:]} & {4, 20}


def test_settings_round_trip_and_validation():
    s = TransferSettings(dataset="advbench", split="all", limit=5, core_share=0.3, direction_id="d", prune_id="p",
                         judge="p_i@0.3", generate=8, exclude_found=False)
    assert TransferSettings.from_dict(json.loads(json.dumps(asdict(s)))) == s
    assert TransferSettings.from_dict(asdict(TransferSettings())) == TransferSettings()
    for bad in ({"split": "dev"}, {"limit": 0}, {"core_share": 0.0}, {"core_share": 1.5}, {"n_bins": 0},
                {"n_alpaca": -1}, {"judge": "vibes"}):
        with pytest.raises(UsageError):
            TransferSettings(**bad)


def test_cli_missing_analysis(planted, tmp_path):
    Store.create(tmp_path / "empty")
    res = CliRunner().invoke(app, ["analyze", "transfer", "--model", str(planted.model_dir), "--dataset",
                                   str(planted.held_out), "--store", str(tmp_path / "empty")])
    assert res.exit_code == 2 and res.stdout == ""
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [res.stderr.splitlines()[-1]] == [
        f"error: no prune analysis for {planted.model_dir} in {tmp_path / 'empty'}; run "
        f"`python cli.py analyze prune --model {planted.model_dir} --store {tmp_path / 'empty'}` first"]
