"""The report's findings: the verdict rule on planted rates, the best judge's verdicts, the paper's figures file."""

import json

import pytest

from analyze import findings
from analyze.judges import get_judge
from store import Store

NOW = "TIMESTAMP '2025-01-01 00:00:00'"


def plant_obrien(store: Store, n_jailbroken: int, n: int = 10, judge: str = "content:x") -> None:
    """A controls analysis whose O'Brien set at k = 2 jailbreaks n_jailbroken of n refused prompts."""
    with store.transaction() as con:
        con.execute(f"INSERT INTO analyses VALUES ('ctl', 'controls', 'planted', NULL, ?, '{{}}', '{{}}', {NOW}, 't')",
                    [judge])
        for i in range(n):
            verdict = "compliance" if i < n_jailbroken else "refusal"
            con.execute("INSERT INTO control_results VALUES ('ctl', 'obrien', 2, ?, 5, 'run1', ?, 0.1, ?, ?, TRUE)",
                        [f"p{i}", i, verdict, verdict == "compliance"])


def obrien_row(store: Store) -> findings.Finding:
    (row,) = [f for f in findings.findings(store) if f.quantity.startswith("O'Brien")]
    return row


def test_a_paper_rate_inside_our_interval_reproduces(tmp_path):
    store = Store.create(tmp_path / "s")
    plant_obrien(store, 0)                       # 0/10: Wilson [0%, 28%] holds the paper's 10% and 7%
    row = obrien_row(store)
    assert row.ours == "0% [0%, 28%] (0/10) at k = 2"
    assert row.verdict.startswith("Reproduces") and "n = 10" in row.verdict
    assert row.paper == "gemma-2-2b-it: 10%; llama-3.1-8b-it: 7%"
    assert row.judge == "content:x (kappa 0.49)"


def test_a_paper_rate_outside_our_interval_differs_and_says_how(tmp_path):
    store = Store.create(tmp_path / "s")
    plant_obrien(store, 8)                       # 8/10: [49%, 94%], above both
    row = obrien_row(store)
    assert row.ours.startswith("80% [49%, 94%] (8/10)")
    assert row.verdict.startswith("Differs") and "10%, 7%" in row.verdict


def test_the_best_judge_replaces_the_stage_verdicts_only_where_it_judged_every_item(tmp_path):
    store = Store.create(tmp_path / "s")
    plant_obrien(store, 8)
    best = get_judge(findings.best_judge().name).judge_id
    assert findings.best_judge().name == "rubric"                        # highest kappa in data/judge/eval.json
    with store.transaction() as con:                                     # the best judge calls 2 of them compliance
        for i in range(9):
            con.execute(f"INSERT INTO judgements VALUES ('run1', ?, ?, ?, ?, NULL, NULL, {NOW})",
                        [i, best, f"p{i}", "compliance" if i < 2 else "evasive"])
    assert obrien_row(store).judge.startswith("content:x")               # one item unjudged: the stage's judge
    with store.transaction() as con:
        con.execute(f"INSERT INTO judgements VALUES ('run1', 9, ?, 'p9', 'refusal', NULL, NULL, {NOW})", [best])
    row = obrien_row(store)
    assert row.ours.startswith("20% [6%, 51%] (2/10)") and row.judge == f"{best} (kappa 0.70)"
    assert row.verdict.startswith("Reproduces")


def test_rows_without_a_stage_or_a_paper_figure_are_not_testable(tmp_path):
    store = Store.create(tmp_path / "s")
    rows = findings.findings(store)
    assert rows and all(f.verdict.startswith("Not testable here: ") for f in rows)
    assert any("python cli.py analyze direction" in f.verdict for f in rows)
    frame = findings.findings_frame(rows)
    assert frame.columns == ["quantity", "paper", "paper section", "ours (n, 95% CI)", "judge", "verdict"]


def test_the_paper_figures_file_has_a_section_and_an_honest_value_for_each_row():
    raw = json.loads(findings.FIGURES_PATH.read_text())
    for key, fig in raw["figures"].items():
        assert fig["quantity"] and fig["section"], key
        assert "value" in fig or "values" in fig, key
        if fig.get("value") is None and "values" not in fig:
            assert fig["note"] and findings._paper_text(fig).startswith("not known here"), key   # no guessed number
    assert raw["figures"]["stage3_alone"]["value"] == {"k": 330, "n": 372}
    assert raw["figures"]["taxonomy_prompts"]["value"] == 2586


@pytest.mark.parametrize("name, kappa", [("rubric", 0.701), ("content", 0.495), ("phrase", 0.261)])
def test_judge_qualities_are_the_measured_ones(name, kappa):
    q = findings.judge_qualities()[name]
    assert q.kappa == kappa and q.n == 222
    assert list(findings.judge_qualities()) == ["rubric", "content", "phrase"]


def plant_costs(store: Store, *rows: dict) -> None:
    """Pooled `costs` rows (set_prompt_id NULL) of one costs analysis."""
    with store.transaction() as con:
        for row in rows:
            row = {"costs_id": "c1", "model": "planted", "settings": "{}", "code_version": "t", **row}
            cols = ", ".join(row)
            con.execute(f"INSERT INTO costs ({cols}, created_at) VALUES ({', '.join('?' * len(row))}, {NOW})",
                        list(row.values()))


def row_of(store: Store, key: str) -> findings.Finding:
    (row,) = [f for f in findings.findings(store) if f.quantity == findings.paper_figures()[key]["quantity"]]
    return row


BASELINE = {"condition": "baseline", "ce_alpaca": 2.0, "n_alpaca": 8, "ce_text": 3.0, "n_text": 4,
            "ce_alpaca_diff": 0.0, "ce_text_diff": 0.0}
# the pooled means differ from the baseline by +0.5 and +0.2; the stored paired differences (mean over sets, on
# the same prompts) are other numbers, so the row shows which one it read
ABLATED = {"condition": "feature_ablation", "ce_alpaca": 2.5, "n_alpaca": 8, "ce_text": 3.2, "n_text": 4}
STORED_DIFFS = {"ce_alpaca_diff": 0.3, "ce_alpaca_diff_low": 0.1, "ce_alpaca_diff_high": 0.45,
                "ce_text_diff": 0.15, "ce_text_diff_low": -0.05, "ce_text_diff_high": 0.35}


def test_ce_delta_reads_the_stored_paired_difference_and_interval(tmp_path):
    store = Store.create(tmp_path / "s")
    plant_costs(store, BASELINE, {**ABLATED, **STORED_DIFFS})
    assert row_of(store, "ce_delta").ours == ("feature_ablation +0.300 [+0.100, +0.450] Alpaca (n = 8) / "
                                              "+0.150 [-0.050, +0.350] WikiText-2 (n = 4) nats; "
                                              "paired bootstrap 95% intervals")


def test_ce_delta_without_stored_intervals_says_so(tmp_path):
    store = Store.create(tmp_path / "s")                     # an old store: the 0013 columns are NULL
    plant_costs(store, {**BASELINE, "ce_alpaca_diff": None, "ce_text_diff": None}, ABLATED)
    assert row_of(store, "ce_delta").ours == ("feature_ablation +0.500 Alpaca (n = 8) / +0.200 WikiText-2 (n = 4) nats; "
                                              "no interval stored")


def plant_stage3_alone(store: Store, n_sweep: int | None, n_redundancy: int, n: int = 4) -> None:
    """A stage-3 sweep whose stage3_alone ranker jailbreaks n_sweep of n prompts (None: no such rows), and a
    redundancy analysis whose stage-3-only ablation jailbreaks n_redundancy of them."""
    with store.transaction() as con:
        con.execute(f"INSERT INTO analyses VALUES ('sw', 'stage3', 'planted', 'pr', 'content:x', '{{}}', '{{}}', {NOW}, 't')")
        con.execute(f"INSERT INTO redundancy_analyses VALUES ('red', 'planted', 'pr', 'sw', 'content:x', '{{}}', '{{}}', "
                    f"'clean', 'abl', 's3', NULL, '{{}}', {NOW}, 't')")
        for i in range(n):
            con.execute("INSERT INTO stage3_outcomes VALUES ('sw', 'fm', 4, ?, 9, 'fm_run', ?, 0.1, 'refusal', FALSE)",
                        [f"p{i}", i])
            if n_sweep is not None:
                verdict = "compliance" if i < n_sweep else "refusal"
                con.execute("INSERT INTO stage3_outcomes VALUES ('sw', 'stage3_alone', 0, ?, 4, 'alone_run', ?, 0.1, ?, ?)",
                            [f"p{i}", i, verdict, verdict == "compliance"])
            verdict = "compliance" if i < n_redundancy else "refusal"
            con.execute("INSERT INTO redundancy_ablations VALUES ('red', ?, 'stage3', 4, 's3', ?, 0.1, ?, ?)",
                        [f"p{i}", i, verdict, verdict == "compliance"])


def test_stage3_alone_is_read_from_the_sweep_not_the_redundancy_analysis(tmp_path):
    store = Store.create(tmp_path / "s")
    plant_stage3_alone(store, n_sweep=3, n_redundancy=1)
    row = row_of(store, "stage3_alone")
    assert row.ours.startswith("75% [") and row.ours.endswith("(3/4)")
    assert row.judge == "content:x (kappa 0.49)" and "n = 4" in row.verdict


def test_stage3_alone_falls_back_to_the_redundancy_analysis_without_sweep_rows(tmp_path):
    store = Store.create(tmp_path / "s")
    plant_stage3_alone(store, n_sweep=None, n_redundancy=1)
    row = row_of(store, "stage3_alone")
    assert row.ours.startswith("25% [") and "(1/4) (from the redundancy analysis" in row.ours


def test_fm_and_probe_accuracy_carry_a_wilson_interval_over_the_test_prompts(tmp_path):
    from analyze.metrics import wilson

    store = Store.create(tmp_path / "s")
    metrics = {"fm_accuracy": {"test": 0.75}, "probe_accuracy": {"test": 0.5}, "fm_model_id": "fm1"}
    with store.transaction() as con:
        con.execute(f"INSERT INTO analyses VALUES ('sw', 'stage3', 'planted', NULL, 'content:x', '{{}}', ?, {NOW}, 't')",
                    [json.dumps(metrics)])
        con.execute(f"INSERT INTO fm_models VALUES ('fm1', 'fm', 'planted', 4, 10, 1, 1, 0.75, 1, 0.1, '{{}}', ?, "
                    f"'{{}}', 'w', {NOW}, 't')", [json.dumps({"n_prompts": {"train": 30, "val": 4, "test": 8}})])
    (row,) = [f for f in findings.findings(store) if f.quantity.startswith("FM vs linear-probe")]
    low, high = wilson(6, 8)                                             # 0.75 of 8 test prompts
    assert f"FM 0.750 [{low:.3f}, {high:.3f}]" in row.ours and "n = 8 test prompts" in row.ours
    assert f"probe 0.500 [{wilson(4, 8)[0]:.3f}, {wilson(4, 8)[1]:.3f}]" in row.ours
