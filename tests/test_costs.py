"""Costs: CE loss equals a direct computation, per-set mean/std, over-refusal through a pluggable judge."""

from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analyze import costs
from analyze.costs import CostsSettings
from analyze.judges import Verdict
from analyze.metrics import wilson
from extract.chat import render_chat
from extract.hooks import intervened
from extract.interventions import Intervention
from extract.models import load_model
from extract.run import ExtractSettings, SaeRef, extract, make_items
from extract.saes import load_sae
from store import Store, UsageError
from tests.tiny_saes import build_tiny_sae


@dataclass(frozen=True)
class EvenJudge:
    """Refusal iff the prompt has an even number of characters: a known answer without reading completions."""

    name: str = "even"
    needs_completion: bool = False

    @property
    def judge_id(self) -> str:
        return "even:1"

    def judge(self, inputs):
        return [Verdict("refusal" if len(x.prompt) % 2 == 0 else "compliance") for x in inputs]


def direct_ce(model, ids: list[int], scored: list[int], spec: Intervention | None = None, saes=None) -> tuple[float, int]:
    """Sum of CE (nats) over positions `scored`, each predicted from the position before, one unpadded forward."""
    with torch.no_grad(), intervened(model.blocks, spec or Intervention(), saes or {},
                                     model.model.get_input_embeddings()):
        logits = model.model(input_ids=torch.tensor([ids])).logits[0]                # [seq, vocab]
    cols = torch.tensor(scored) - 1
    loss = F.cross_entropy(logits[cols], torch.tensor([ids[p] for p in scored]), reduction="sum")
    return float(loss), len(scored)


def expected_ce(model, samples, spec=None, saes=None) -> tuple[float, float]:
    """Token-weighted CE over (Alpaca chat prompts, raw text windows) computed directly."""
    total_a = [direct_ce(model, c.input_ids, [p for p, r in enumerate(c.roles) if r == "user" and p > 0], spec, saes)
               for c in (render_chat(model.tokenizer, p.text) for p in samples.alpaca)]
    total_t = []
    for p in samples.text:
        ids = model.tokenizer(p.text, add_special_tokens=False)["input_ids"]
        if model.has_bos:
            ids = [model.tokenizer.bos_token_id, *ids]
        total_t.append(direct_ce(model, ids, list(range(1, len(ids))), spec, saes))
    return (sum(s for s, _ in total_a) / sum(n for _, n in total_a),
            sum(s for s, _ in total_t) / sum(n for _, n in total_t))


SETTINGS = CostsSettings(n_alpaca=5, n_text=3, window=24, n_xstest=9, generate=3, batch_size=3)


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    return build_tiny_sae("topk", 64, 128, tmp_path_factory.mktemp("sae"), seed=1)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_ce_of_unmodified_model_equals_direct_computation(tmp_path, tiny_model_dirs, arch):
    model = load_model(str(tiny_model_dirs(arch)))
    store = Store.create(tmp_path / "s")
    settings = CostsSettings(n_alpaca=4, n_text=3, window=20, n_xstest=0, conditions=("baseline",), batch_size=3)
    result = costs.run(store, model, [], settings)
    row = result.table.row(0, named=True)
    want_alpaca, want_text = expected_ce(model, costs._samples(model, settings))
    assert row["condition"] == "baseline" and row["n_alpaca"] == 4 and row["n_text"] == 3
    assert row["ce_alpaca"] == pytest.approx(want_alpaca, rel=1e-4)
    assert row["ce_text"] == pytest.approx(want_text, rel=1e-4)
    stored = store.sql("SELECT ce_alpaca, ce_text FROM costs WHERE costs_id = ?", [result.costs_id])
    assert stored.row(0) == pytest.approx((row["ce_alpaca"], row["ce_text"]))


def test_direction_and_feature_ablation_and_over_refusal(tmp_path, tiny_model_dirs, tiny_sae):
    model = load_model(str(tiny_model_dirs("qwen2")))
    store = Store.create(tmp_path / "s")
    sae = SaeRef(1, str(tiny_sae), load_sae(str(tiny_sae)))
    direction = tuple(np.random.default_rng(0).normal(size=model.d_model).tolist())
    sets = {"p-a": ((1, 3), (1, 7)), "p-b": tuple((1, f) for f in range(64)), "p-c": ((1, 3), (1, 50), (1, 90))}
    result = costs.run(store, model, [sae], SETTINGS, direction=direction, feature_sets=sets, judge=EvenJudge())
    table = {r["condition"]: r for r in result.table.iter_rows(named=True)}
    assert set(table) == {"baseline", "direction_ablation", "feature_ablation"} and not result.skipped
    samples = costs._samples(model, SETTINGS)

    spec = Intervention(direction_ablate=direction)
    want_alpaca, want_text = expected_ce(model, samples, spec)
    assert table["direction_ablation"]["ce_alpaca"] == pytest.approx(want_alpaca, rel=1e-4)
    assert table["direction_ablation"]["ce_text"] == pytest.approx(want_text, rel=1e-4)

    per_set = {r["set_prompt_id"]: r for r in result.per_set.iter_rows(named=True)}
    assert set(per_set) == set(sets)
    want = expected_ce(model, samples, Intervention(zero_ablate={1: tuple(range(64))}), {1: sae.sae})
    assert (per_set["p-b"]["ce_alpaca"], per_set["p-b"]["ce_text"]) == pytest.approx(want, rel=1e-4)
    assert per_set["p-b"]["ce_text"] != pytest.approx(table["baseline"]["ce_text"], rel=1e-4)   # it did ablate
    feat = table["feature_ablation"]
    values = [per_set[p]["ce_text"] for p in sorted(sets)]
    assert feat["n_sets"] == 3 and feat["n_features"] == pytest.approx((2 + 64 + 3) / 3)
    assert feat["ce_text"] == pytest.approx(np.mean(values)) and feat["ce_text_std"] == pytest.approx(np.std(values, ddof=1))

    even = np.mean([len(p.text) % 2 == 0 for p in samples.xstest])
    assert table["baseline"]["over_refusal"] == pytest.approx(even) and table["baseline"]["n_xstest"] == 9
    assert feat["over_refusal"] == pytest.approx(even) and feat["n_xstest"] == 9
    assert sum(r["n_xstest"] for r in per_set.values()) == 9                  # prompt j gets set j mod 3
    judged = store.sql("SELECT count(*) AS n FROM judgements WHERE judge = 'even:1'")["n"][0]
    assert judged == 9 * 3                                                     # one xstest run per condition

    # the difference to baseline on the same prompts, with its paired bootstrap interval (issue 15)
    for corpus in ("alpaca", "text"):
        assert table["baseline"][f"ce_{corpus}_diff"] == 0.0
        for name in ("direction_ablation", "feature_ablation"):
            row = table[name]
            assert row[f"ce_{corpus}_diff"] == pytest.approx(row[f"ce_{corpus}"] - table["baseline"][f"ce_{corpus}"],
                                                             abs=1e-6)         # float32 items vs a float64 sum
            assert row[f"ce_{corpus}_diff_low"] <= row[f"ce_{corpus}_diff"] <= row[f"ce_{corpus}_diff_high"]
    assert table["feature_ablation"]["ce_text_diff_high"] > table["feature_ablation"]["ce_text_diff_low"]
    k = round(even * 9)
    assert (table["baseline"]["over_refusal_ci_low"], table["baseline"]["over_refusal_ci_high"]) == \
        pytest.approx(wilson(k, 9))
    stored = store.sql("SELECT condition, ce_text_diff, over_refusal_ci_high FROM costs WHERE costs_id = ? AND "
                       "set_prompt_id IS NULL ORDER BY condition", [result.costs_id])
    assert stored["ce_text_diff"].to_list() == pytest.approx(
        [table[c]["ce_text_diff"] for c in ("baseline", "direction_ablation", "feature_ablation")])
    assert "Δ text" in costs.costs_table(result).columns and "] (" in costs.summary_line(result)


def test_missing_direction_and_sets_are_skipped_with_the_command_to_run(tmp_path, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("qwen2")))
    store = Store.create(tmp_path / "s")
    settings = CostsSettings(n_alpaca=2, n_text=1, window=16, n_xstest=0)
    result = costs.run(store, model, [], settings)
    assert result.table["condition"].to_list() == ["baseline"]
    assert "analyze direction" in result.skipped["direction_ablation"]
    assert "analyze prune" in result.skipped["feature_ablation"]
    with pytest.raises(UsageError, match="nothing to measure"):
        costs.run(store, model, [], CostsSettings(n_xstest=0, conditions=("feature_ablation",)))


def test_text_windows_are_about_window_tokens_and_seeded(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("qwen2")))
    first = costs.text_windows(model.tokenizer, 5, 40, seed=3)
    assert first == costs.text_windows(model.tokenizer, 5, 40, seed=3)
    assert first != costs.text_windows(model.tokenizer, 5, 40, seed=4)
    lengths = [len(model.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in first]
    assert all(abs(n - 40) <= 2 for n in lengths), lengths


def test_loss_setting_keeps_old_run_ids_and_raw_items_hash_apart(tmp_path, tiny_model_dirs):
    assert "loss" not in ExtractSettings().hashed() and ExtractSettings(loss=True).hashed()["loss"] is True
    model = load_model(str(tiny_model_dirs("qwen2")))
    prompts = costs.text_windows(model.tokenizer, 2, 16, seed=0)
    store = Store.create(tmp_path / "s")
    chat = extract(store, model, make_items(model, prompts), settings=ExtractSettings(positions="last:1"))
    raw = extract(store, model, make_items(model, prompts, raw=True), settings=ExtractSettings(positions="last:1"))
    assert chat.run_id != raw.run_id
    assert store.sql("SELECT count(*) AS n FROM chats")["n"][0] == 2            # raw texts are no chat renderings
    assert store.sql("SELECT count(*) AS n FROM items WHERE ce_loss IS NOT NULL")["n"][0] == 0


def test_settings_round_trip_and_validation():
    s = CostsSettings(n_alpaca=3, conditions=("baseline", "feature_ablation"), max_prompts=4)
    assert CostsSettings.from_dict(asdict(s)) == s
    assert CostsSettings.from_dict({"conditions": ["baseline"]}).conditions == ("baseline",)
    with pytest.raises(UsageError, match="unknown setting"):
        CostsSettings.from_dict({"n_pile": 3})
    with pytest.raises(UsageError, match="conditions"):
        CostsSettings(conditions=("steering",))
    with pytest.raises(UsageError, match="generate"):
        CostsSettings(generate=0)


def test_feature_sets_are_ablated_with_the_position_0_rule_that_found_them(tmp_path):
    import json
    from types import SimpleNamespace

    store = Store.create(tmp_path / "s")
    with store.transaction() as con:                      # a prune analysis run with --no-ablate-first
        con.execute("INSERT INTO analyses VALUES ('pr', 'prune', 'm', 'cand', 'p_i', ?, '{}', "
                    "TIMESTAMP '2025-01-01 00:00:00', 't')", [json.dumps({"ablate_first": False})])
    model = SimpleNamespace(name="m")
    settings = CostsSettings(conditions=("feature_ablation",), n_xstest=0)
    sets = {"p1": [(3, 1), (3, 2)]}
    (found,), _ = costs._conditions(store, model, settings, None, sets, "pr")
    assert found.specs[0].zero_ablate == {3: (1, 2)} and found.specs[0].zero_ablate_first is False
    (default,), _ = costs._conditions(store, model, settings, None, sets)          # no source: the default rule
    assert default.specs[0].zero_ablate_first is True
