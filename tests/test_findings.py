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
