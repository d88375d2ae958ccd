"""The report: every section present, "not run yet" where the store lacks data, renders in headless chromium."""

import base64
import io
import re
import shutil
import subprocess
from dataclasses import asdict

import numpy as np
import polars as pl
import pytest
from matplotlib import image
from typer.testing import CliRunner

from analyze import report
from analyze.report import SECTIONS, ReportSettings
from cli import app
from store import Store, UsageError
from tests.planted_acts import planted_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOW = "TIMESTAMP '2025-01-01 00:00:00'"


def fill_analysis_tables(store: Store) -> None:
    """A few rows in each analysis table a section reads (shapes only; the numbers are made up)."""
    with store.transaction() as con:
        con.execute(f"INSERT INTO analyses VALUES ('dir1', 'direction', 'planted', NULL, 'content:x', '{{}}', '{{}}', {NOW}, 't')")
        for layer in range(4):
            con.execute("INSERT INTO directions (direction_id, layer, vector, raw_norm, evaluated, n_refused, asr, "
                        "asr_phrase, mean_p_i, kl_harmless, cos_harmful, cos_harmful_std, cos_benign, cos_benign_std, "
                        "selected) VALUES ('dir1', ?, [0.6, 0.8]::FLOAT[], 3.0, TRUE, 10, ?, ?, 0.2, 0.1, "
                        "?, 0.05, ?, 0.04, ?)", [layer, layer / 4, layer / 5, 0.1 * layer, 0.02 * layer, layer == 2])
        for k, chosen in ((10, False), (20, True)):
            con.execute("INSERT INTO candidate_sets VALUES ('c1', 'p1', ?, ?, 'r', 0, 0.3, 'compliance', ?, ?)",
                        [k, 2 * k, chosen, chosen])
        con.execute("INSERT INTO feature_sets (set_id, stage, prompt_id, tau, layer, feature, selected) VALUES "
                    "('pr1', 2, 'p1', 0.5, 2, 2, TRUE), ('pr1', 2, 'p1', 0.5, 3, 4, TRUE), ('pr1', 2, 'p2', 0.5, 2, 1, TRUE)")
        for kind, jail in (("set", True), ("random", False)):
            con.execute("INSERT INTO set_checks VALUES ('pr1', 2, 'p1', 0.5, ?, 2, 'r', 0, 0.1, 'x', ?, TRUE)", [kind, jail])
        con.execute(f"INSERT INTO fm_models VALUES ('fm1', 'fm', 'planted', 20, 100, 0.9, 0.8, 0.85, 3, 0.1, '{{}}', "
                    f"'{{}}', '{{}}', 'models/fm1.safetensors', {NOW}, 't')")
        for ranker in ("fm", "probe"):
            for k in (100, 200):
                con.execute("INSERT INTO stage3_asr (sweep_id, ranker, k, n_prompts, n_jailbroken, asr, run_id) VALUES ('sw1', ?, ?, 10, ?, ?, 'r')", [ranker, k, k // 50, k / 500])
        for cond, ce in (("baseline", 1.0), ("direction_ablation", 1.1), ("feature_ablation", 1.3)):
            con.execute(f"INSERT INTO costs (costs_id, model, condition, n_sets, ce_alpaca, ce_alpaca_std, ce_text, "
                        f"over_refusal, n_xstest, judge, settings, created_at, code_version) "
                        f"VALUES ('co1', 'planted', ?, 2, ?, 0.1, ?, 0.08, 250, 'content:x', '{{}}', {NOW}, 't')",
                        [cond, ce, ce + 2])
        con.execute("INSERT INTO feature_explanations VALUES (2, 2, 'false premises <b>', 'x.csv', TIMESTAMP '2025-01-01')")


def dom_of(html_path, tmp_path) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", html_path.as_uri()],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_has_every_section_and_runs_what_the_store_has(tmp_path):
    store = planted_store(tmp_path / "s")
    fill_analysis_tables(store)
    result = report.run(store, ReportSettings(out=str(tmp_path / "out")))
    status = dict(result.sections)
    assert [t for t, _ in result.sections] == [s.title for s in SECTIONS]
    assert not [t for t, s in result.sections if s == "error"], result.sections
    assert status["Costs: cross-entropy loss"] == "ok"
    assert status["Taxonomy: features by CoCoNot harm subcategory (unsafe requests)"] == "ok"
    assert status["Findings: the paper's headline figures beside ours"] == "ok"
    assert result.sections[0][0].startswith("Findings")                 # the findings come first
    assert status["Feature cards"] == "ok"
    assert status["Redundancy: dormant features and where they switch on"] == "not run"
    html = result.html.read_text()
    assert "not run yet: <code>python cli.py analyze redundancy</code>" in html
    assert "feature 2:2 &mdash; false premises &lt;b&gt;" in html and "<mark>" in html
    assert html.count("data:image/png;base64,") >= 5
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html and "<link" not in html
    md = result.markdown.read_text()
    assert all(f"## {s.title}" in md for s in SECTIONS) and "```sql" in md
    assert all((tmp_path / "out" / "report_files" / f"figure-{k}.png").is_file() for k in (1, 2))


def test_empty_store_renders_every_section_as_not_run(tmp_path):
    store = Store.create(tmp_path / "s")
    result = report.run(store)
    assert {s for _, s in result.sections} == {"not run"}
    assert result.html == tmp_path / "s" / "report" / "report.html"
    assert result.html.read_text().count("not run yet") == len(SECTIONS)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (scripts/setup.sh installs Debian's chromium as root)")
def test_report_renders_in_headless_chromium(tmp_path):
    store = planted_store(tmp_path / "s")
    fill_analysis_tables(store)
    result = report.run(store, ReportSettings(out=str(tmp_path / "out")))
    dom = dom_of(result.html, tmp_path)
    for section in SECTIONS:
        assert f"<h2>{section.title.replace('>', '&gt;')}</h2>" in dom, section.title
    assert dom.index("<h2>Findings") < dom.index("<h2>SAE quality")        # the findings come first
    sources = re.findall(r'<img [^>]*src="([^"]*)"', dom)
    assert len(sources) >= 5
    for src in sources:                                                   # no broken image: each is a PNG that decodes
        assert src.startswith("data:image/png;base64,"), src[:60]
        pixels = image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 10
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1200,2400", f"--screenshot={shot}",
                    result.html.as_uri()], capture_output=True, timeout=60, check=True)
    pixels = image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200) and float(np.std(pixels)) > 0.05   # not a blank page


def test_cli_report(tmp_path):
    planted_store(tmp_path / "s")
    out = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert f"report: {tmp_path / 'r' / 'report.html'}" in out.output
    missing = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and missing.output.startswith("error: no store at")


def test_settings_round_trip():
    s = ReportSettings(out="x", max_cards=3)
    assert ReportSettings.from_dict(asdict(s)) == s
    with pytest.raises(UsageError, match="unknown setting"):
        ReportSettings.from_dict({"title": "x"})


def test_examples_show_the_prompt_its_clean_and_ablated_completions_and_the_verdict(tmp_path):
    from tests.planted_acts import PROMPTS
    store = planted_store(tmp_path / "s")
    d = PROMPTS[3]                                                        # the ablated run's prompt
    with store.transaction() as con:
        con.execute("UPDATE items SET completion = 'I am sorry, no.' WHERE run_id = 'clean0000000000a' AND prompt_id = ?",
                    [d.prompt_id])
        con.execute("UPDATE items SET completion = 'Pizza, of course.' WHERE run_id = 'ablated00000000b'")
        con.execute("INSERT INTO candidate_sets VALUES ('c9', ?, 20, 40, 'ablated00000000b', 0, 0.1, 'compliance', "
                    "TRUE, TRUE)", [d.prompt_id])
    result = report.run(store, ReportSettings(out=str(tmp_path / "out")))
    assert dict(result.sections)["Examples: clean and ablated completions"] == "ok"
    html = result.html.read_text()
    start = html.index('<details class="toggle"><summary>Show the examples (content warning')
    shown = html[start:html.index("</details>", html.index("</table>", start))]
    assert "stage 1" in shown and "top-20 candidates per layer" in shown and d.text in shown
    assert "I am sorry, no." in shown and "Pizza, of course." in shown and "compliance" in shown


def test_rates_in_report_tables_get_wilson_intervals_from_their_counts():
    from analyze.metrics import wilson
    from analyze.report import with_intervals
    df = pl.DataFrame({"set_id": ["a", "b"], "n_prompts": [8, 0], "n_jailbroken": [5, 0], "asr": [0.625, None],
                       "mean_n_features": [3.0, None]})
    out = with_intervals(df)
    assert out.columns == ["set_id", "n_prompts", "n_jailbroken", "asr", "ci_low", "ci_high", "mean_n_features"]
    assert out["ci_low"][0] == pytest.approx(wilson(5, 8)[0]) and out["ci_high"][0] == pytest.approx(wilson(5, 8)[1])
    assert out["ci_low"][1] is None                                  # no prompts: no interval
    stored = df.with_columns(pl.lit(0.1).alias("ci_low"))
    assert with_intervals(stored).equals(stored)                     # a stored interval is kept as it is
    direction = pl.DataFrame({"layer": [3], "n_refused": [10], "n_jailbroken": [3], "asr": [0.3]})
    assert with_intervals(direction)["ci_high"][0] == pytest.approx(wilson(3, 10)[1])
