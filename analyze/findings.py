"""The report's findings: each of the paper's headline figures beside ours, with n, a 95% interval and a verdict.

The paper's figures come from one data file, data/paper/figures.json (with the section each is
from; null where this project does not know the number). Ours are read from the store: the
newest analysis of each kind. Every rate is re-judged with the best judge measured against the
gold labels (highest kappa in data/judge/eval.json) wherever the store holds that judge's verdicts
for every item the rate counts (`python cli.py judge rerun --judge rubric`); otherwise the stage's
own judge is used, and the row names it. The verdict is one sentence from a fixed rule: a
paper rate inside our Wilson 95% interval reproduces, outside it differs; a figure the paper has
but we lack (or the reverse) is not testable here, and the row says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import polars as pl

from analyze import taxonomy
from analyze.judges import get_judge
from analyze.metrics import accuracy_text, rate_text, wilson
from extract.datasets import DATA_DIR
from store import Store, UsageError

FIGURES_PATH = DATA_DIR / "paper" / "figures.json"
JUDGE_EVAL_PATH = DATA_DIR / "judge" / "eval.json"


@dataclass(frozen=True)
class Finding:
    quantity: str
    paper: str                            # the paper's figure as text ("not known here" when null)
    section: str                          # where in the paper
    ours: str                             # our figure with n and interval ("not run" when absent)
    judge: str                            # the judge behind our figure ("" when none judges it)
    verdict: str                          # one sentence: reproduces / differs (how) / not testable here (why)


@dataclass(frozen=True)
class JudgeQuality:
    name: str
    kappa: float
    kappa_ci: tuple[float, float]
    accuracy: float
    accuracy_ci: tuple[float, float]
    n: int

    def text(self) -> str:
        return (f"{self.name} (kappa {self.kappa:.3f} [{self.kappa_ci[0]:.3f}, {self.kappa_ci[1]:.3f}], accuracy "
                f"{self.accuracy:.3f} [{self.accuracy_ci[0]:.3f}, {self.accuracy_ci[1]:.3f}] against the gold labels, "
                f"n = {self.n})")


@cache
def paper_figures() -> dict[str, dict[str, Any]]:
    """The paper's headline figures, by key (data/paper/figures.json)."""
    return json.loads(FIGURES_PATH.read_text(encoding="utf-8"))["figures"]


@cache
def judge_qualities() -> dict[str, JudgeQuality]:
    """Each judge's measured agreement with the gold labels (data/judge/eval.json), best (highest kappa) first."""
    raw = json.loads(JUDGE_EVAL_PATH.read_text(encoding="utf-8"))
    out = [JudgeQuality(name, j["kappa"], tuple(j["kappa_ci"]), j["accuracy"], tuple(j["accuracy_ci"]), raw["n"])
           for name, j in raw["judges"].items()]
    return {q.name: q for q in sorted(out, key=lambda q: -q.kappa)}


def best_judge() -> JudgeQuality:
    """The judge with the highest measured kappa."""
    return next(iter(judge_qualities().values()))


def judge_label(judge_id: str) -> str:
    """A judge id ("rubric:1eed1aba") with its measured kappa when it has one."""
    q = judge_qualities().get(judge_id.partition(":")[0].partition("@")[0])
    return f"{judge_id} (kappa {q.kappa:.2f})" if q else f"{judge_id} (kappa not measured)"


# ---- reading rates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Counted:
    k: int
    n: int
    judge: str

    def text(self) -> str:
        return rate_text(self.k, self.n)


def _newest(store: Store, kind: str) -> dict[str, Any] | None:
    rows = store.sql("SELECT analysis_id, judge, metrics FROM analyses WHERE kind = ? ORDER BY created_at DESC LIMIT 1",
                     [kind])
    return rows.row(0, named=True) if rows.height else None


def judged(store: Store, rows_sql: str, params: list[Any], stage_judge: str, label: str = "compliance") -> Counted | None:
    """Count of `label` over rows (run_id, item, verdict): the best judge's verdicts where it judged every row."""
    best = get_judge(best_judge().name).judge_id
    df = store.sql(f"WITH x AS ({rows_sql}) SELECT x.verdict, j.verdict AS best FROM x LEFT JOIN judgements j "
                   f"ON j.run_id = x.run_id AND j.item = x.item AND j.judge = ?", [*params, best])
    if df.is_empty():
        return None
    use_best = df["best"].null_count() == 0
    verdicts = df["best" if use_best else "verdict"]
    return Counted(int((verdicts == label).sum()), df.height, best if use_best else stage_judge)


# ---- the rows ---------------------------------------------------------------------------------

def _verdict_rate(ours: Counted | None, paper: float | None, missing: str) -> str:
    if ours is None:
        return f"Not testable here: {missing}."
    if paper is None:
        return "Not testable here: the paper's figure is not known to this project (data/paper/figures.json)."
    low, high = wilson(ours.k, ours.n)
    if low <= paper <= high:
        return f"Reproduces: the paper's {100 * paper:.0f}% lies inside our interval (n = {ours.n})."
    side = "above" if ours.k / ours.n > paper else "below"
    return f"Differs: ours is {side} the paper's {100 * paper:.0f}% (interval {100 * low:.0f}-{100 * high:.0f}%, n = {ours.n})."


def _row(key: str, ours: str, judge: str, verdict: str, quantity: str | None = None) -> Finding:
    fig = paper_figures()[key]
    return Finding(quantity or fig["quantity"], _paper_text(fig), fig["section"], ours, judge, verdict)


def _paper_text(fig: dict[str, Any]) -> str:
    if "values" in fig:
        values = fig["values"]
        if isinstance(values, dict):
            return "; ".join(f"{m}: {_value_text(v)}" for m, v in values.items())
        return ", ".join(map(str, values))
    if fig.get("value") is None:
        note = fig.get("note", "")
        return "not known here" + (f" ({note})" if note and note != "not known here" else "")
    return _value_text(fig["value"])


def _value_text(v: Any) -> str:
    if isinstance(v, dict) and "layer" in v:
        return f"layer {v['layer']} of {v['n_layers']} ({v['layer'] / v['n_layers']:.2f} of depth)"
    if isinstance(v, dict) and "k" in v:
        return f"{v['k']}/{v['n']} ({100 * v['k'] / v['n']:.0f}%)" if v.get("n") else f"{v['k']} prompts"
    if isinstance(v, float) and v <= 1:
        return f"{100 * v:.0f}%"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _direction(store: Store) -> list[Finding]:
    a = _newest(store, "direction")
    if a is None:
        return [_row(k, "not run", "", "Not testable here: no direction analysis (`python cli.py analyze direction`).")
                for k in ("l_star", "direction_asr")]
    d = store.sql("SELECT layer, asr, n_refused FROM directions WHERE direction_id = ? AND selected", [a["analysis_id"]])
    layer, asr, n_refused = d.row(0) if d.height else (None, None, 0)
    model = store.sql("SELECT model FROM analyses WHERE analysis_id = ?", [a["analysis_id"]])["model"][0]
    depth = store.sql("SELECT max(l.layer) + 1 AS n FROM layers l JOIN runs r USING (run_id) WHERE r.model = ?", [model])["n"][0]
    where = f"layer {layer} of {depth} ({layer / depth:.2f} of depth), {model}" if depth else f"layer {layer}, {model}"
    papers = [v["layer"] / v["n_layers"] for v in paper_figures()["l_star"]["values"].values()]
    inside = min(papers) <= layer / depth <= max(papers) if depth else False
    l_verdict = (f"Not testable here: another model; at {layer / depth:.2f} of depth ours lies "
                 f"{'between' if inside else 'outside'} the paper's two models ({min(papers):.2f}, {max(papers):.2f}).")
    counted = Counted(round(asr * n_refused), n_refused, a["judge"]) if asr is not None and n_refused else None
    return [_row("l_star", where, "", l_verdict),
            _row("direction_asr", counted.text() if counted else "not evaluated", judge_label(a["judge"]),
                 _verdict_rate(counted, None, "the direction was not evaluated"))]


def _stage2(store: Store) -> list[Finding]:
    a = _newest(store, "prune")
    missing = "no prune analysis (`python cli.py analyze prune`)"
    if a is None:
        return [_row(k, "not run", "", f"Not testable here: {missing}.")
                for k in ("stage2_jailbroken", "stage2_unique_features", "stage2_features_per_prompt", "random_control")]
    pid = a["analysis_id"]
    rows = "SELECT run_id, item, verdict FROM set_checks WHERE set_id = ? AND stage = 2 AND selected AND kind = ?"
    jail = judged(store, rows, [pid, "set"], a["judge"])
    rand = judged(store, rows, [pid, "random"], a["judge"])
    sizes = store.sql("SELECT prompt_id, count(*) AS n FROM feature_sets WHERE set_id = ? AND stage = 2 AND selected "
                      "AND prompt_id IN (SELECT prompt_id FROM set_checks WHERE set_id = ? AND stage = 2 AND selected "
                      "AND kind = 'set' AND jailbroken) GROUP BY prompt_id", [pid, pid])
    unique = store.sql("SELECT count(*) AS n FROM (SELECT DISTINCT layer, feature FROM feature_sets "
                       "WHERE set_id = ? AND stage = 2 AND selected AND prompt_id IN (SELECT prompt_id FROM set_checks "
                       "WHERE set_id = ? AND stage = 2 AND selected AND kind = 'set' AND jailbroken))", [pid, pid])["n"][0]
    per = (f"mean {sizes['n'].mean():.1f}, range {sizes['n'].min()}-{sizes['n'].max()} over {sizes.height} "
           f"jailbroken prompts (the stage's judge)" if sizes.height else "no set jailbreaks")
    no_paper = "Not testable here: the paper's figure is not known to this project (data/paper/figures.json)."
    return [
        _row("stage2_jailbroken", jail.text() if jail else "no set checked", judge_label(jail.judge) if jail else "",
             _verdict_rate(jail, None, missing)),
        _row("stage2_unique_features", f"{unique} (over the sets of the {sizes.height} jailbroken prompts)", "", no_paper),
        _row("stage2_features_per_prompt", per, "", no_paper),
        _row("random_control", rand.text() if rand else "no control", judge_label(rand.judge) if rand else "",
             _verdict_rate(rand, None, "no random control in the prune analysis")),
    ]


def _stage3(store: Store) -> list[Finding]:
    a = _newest(store, "stage3")
    no_paper = "Not testable here: the paper's figure is not known to this project (data/paper/figures.json)."
    best = _best_k(store, a["analysis_id"]) if a else {}
    fm = _sweep_rate(store, a, best, "fm")
    rows = [_row("stage3_paper_set", f"{fm.text()} at K = {best['fm']} (the best K)" if fm else "not run",
                 judge_label(fm.judge) if fm else "",
                 "Not testable here: the paper states no denominator for its 372." if fm
                 else "Not testable here: no stage-3 sweep (`python cli.py analyze stage3`).")]
    alone, source = _stage3_alone(store, a)
    paper = paper_figures()["stage3_alone"]["value"]
    rows.append(_row("stage3_alone", alone.text() + source if alone else "not run",
                     judge_label(alone.judge) if alone else "",
                     _verdict_rate(alone, paper["k"] / paper["n"],
                                   "no stage-3-only ablation (`python cli.py analyze stage3`)")))
    metrics = json.loads(a["metrics"]) if a and a["metrics"] else {}
    acc = {m: metrics.get(f"{m}_accuracy", {}).get("test") for m in ("fm", "probe")}
    if None in acc.values():
        return rows + [_row("fm_vs_probe", "not run", "", "Not testable here: no stage-3 fit (`python cli.py analyze stage3`).")]
    counted = {m: c for m in ("fm", "probe") if (c := _sweep_rate(store, a, best, m))}
    asr = [f"{m} {c.text()} at K = {best[m]}" for m, c in counted.items()]
    text = f"test accuracy {_accuracy_text(store, metrics, acc)}; best ASR " + ", ".join(asr)
    judges = "; ".join(sorted({judge_label(c.judge) for c in counted.values()}))
    return rows + [_row("fm_vs_probe", text, judges, no_paper)]


def _accuracy_text(store: Store, metrics: dict[str, Any], acc: dict[str, float]) -> str:
    """FM and probe test accuracy, each with a Wilson 95% interval over the test prompts (a prompt's n_last rows
    are not independent, so the prompt is the unit: wider than an interval over rows)."""
    n = None
    if metrics.get("fm_model_id"):
        found = store.sql("SELECT CAST(json_extract(data, '$.n_prompts.test') AS INTEGER) AS n FROM fm_models "
                          "WHERE model_id = ?", [metrics["fm_model_id"]])
        n = int(found["n"][0]) if found.height and found["n"][0] is not None else None
    if not n:
        return f"FM {acc['fm']:.3f}, probe {acc['probe']:.3f} (n test not stored)"
    parts = [f"{name} {accuracy_text(acc[key], n)}" for name, key in (("FM", "fm"), ("probe", "probe"))]
    return ", ".join(parts) + f" (n = {n} test prompts, Wilson over prompts)"


ALONE_SWEEP_SQL = "SELECT run_id, item, verdict FROM stage3_outcomes WHERE sweep_id = ? AND ranker = 'stage3_alone'"
ALONE_REDUNDANCY_SQL = "SELECT run_id, item, verdict FROM redundancy_ablations WHERE analysis_id = ? AND kind = 'stage3'"


def _stage3_alone(store: Store, sweep: dict[str, Any] | None) -> tuple[Counted | None, str]:
    """Each prompt's stage-3 set ablated without stage 2, and where the count comes from ("" for the sweep).

    The stage-3 sweep's `stage3_alone` ranker is the paper's quantity (its 330 of 372); the redundancy
    analysis' stage-3-only ablation is read only where the newest sweep has none (made before migration 0013)."""
    if sweep is not None:
        alone = judged(store, ALONE_SWEEP_SQL, [sweep["analysis_id"]], sweep["judge"])
        if alone is not None:
            return alone, ""
    if not _has_table(store, "redundancy_analyses"):
        return None, ""
    red = store.sql("SELECT analysis_id, judge FROM redundancy_analyses ORDER BY created_at DESC LIMIT 1")
    if red.is_empty():
        return None, ""
    alone = judged(store, ALONE_REDUNDANCY_SQL, [red["analysis_id"][0]], red["judge"][0])
    return alone, " (from the redundancy analysis: the stage-3 sweep has no stage3_alone rows)"


def _best_k(store: Store, sweep_id: str) -> dict[str, int]:
    """Per ranker, the K that jailbreaks most prompts (the smallest such K)."""
    by_k = store.sql("SELECT ranker, k, count(*) FILTER (WHERE jailbroken) AS n_j FROM stage3_outcomes "
                     "WHERE sweep_id = ? GROUP BY ranker, k ORDER BY ranker, n_j DESC, k", [sweep_id])
    return {r: int(g["k"][0]) for (r,), g in by_k.group_by(["ranker"], maintain_order=True)}


def _sweep_rate(store: Store, a: dict[str, Any] | None, best: dict[str, int], ranker: str) -> Counted | None:
    if a is None or ranker not in best:
        return None
    return judged(store, "SELECT run_id, item, verdict FROM stage3_outcomes WHERE sweep_id = ? AND ranker = ? AND k = ?",
                  [a["analysis_id"], ranker, best[ranker]], a["judge"])


def _has_table(store: Store, name: str) -> bool:
    return store.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [name])["n"][0] > 0


def _obrien(store: Store) -> list[Finding]:
    a = _newest(store, "controls")
    if a is None:
        return [_row("obrien_max_asr", "not run", "", "Not testable here: no controls analysis (`python cli.py analyze controls`).")]
    ks = store.sql("SELECT DISTINCT k FROM control_results WHERE controls_id = ? AND kind = 'obrien' ORDER BY k",
                   [a["analysis_id"]])["k"].to_list()
    rows = ("SELECT run_id, item, verdict FROM control_results WHERE controls_id = ? AND kind = 'obrien' AND k = ? "
            "AND refused_clean")
    per_k = {k: judged(store, rows, [a["analysis_id"], k], a["judge"]) for k in ks}
    per_k = {k: c for k, c in per_k.items() if c is not None}
    if not per_k:
        return [_row("obrien_max_asr", "no refused prompt", "", "Not testable here: no prompt was refused clean.")]
    k, c = max(per_k.items(), key=lambda kv: (kv[1].k / kv[1].n, -kv[0]))
    papers = paper_figures()["obrien_max_asr"]["values"]
    verdicts = {m: _verdict_rate(c, v, "") for m, v in papers.items()}
    same = len({v.split(":")[0] for v in verdicts.values()}) == 1
    verdict = (next(iter(verdicts.values())).split(":")[0] + f": against both of the paper's models (max {', '.join(f'{100 * v:.0f}%' for v in papers.values())}), "
               f"n = {c.n}; counted on the prompts the controls analysis took." if same else " / ".join(verdicts.values()))
    return [_row("obrien_max_asr", f"{c.text()} at k = {k}", judge_label(c.judge), verdict)]


def _hydra(store: Store) -> list[Finding]:
    if not _has_table(store, "redundancy_switch_on"):
        return []
    red = store.sql("SELECT analysis_id FROM redundancy_switch_on GROUP BY analysis_id ORDER BY count(*) DESC LIMIT 1")
    if red.is_empty():
        return [_row(k, "not run", "", "Not testable here: no redundancy analysis (`python cli.py analyze redundancy`).")
                for k in ("hydra_first_token", "hydra_template")]
    roles = store.sql("SELECT role, count(*) AS n FROM redundancy_switch_on WHERE analysis_id = ? GROUP BY role",
                      [red["analysis_id"][0]])
    n = int(roles["n"].sum())
    share = {r: int(roles.filter(pl.col("role") == r)["n"].sum()) for r in ("first", "template")}
    return [_row("hydra_first_token", rate_text(share["first"], n) + " of switch-on events", "",
                 "Not testable here: the paper gives no number; it clamps at BOS, and here "
                 f"{'none' if share['first'] == 0 else 'some'} of the switch-on events are at the first token."),
            _row("hydra_template", rate_text(share["template"], n) + " of switch-on events", "",
                 "Not testable here: the paper's figure is not known to this project (data/paper/figures.json).")]


CLAMP_ROWS_SQL = """SELECT c.run_id, c.item, j.verdict FROM redundancy_clamping c
JOIN redundancy_analyses r ON r.analysis_id = c.analysis_id
JOIN judgements j ON j.run_id = c.run_id AND j.item = c.item AND j.judge = r.judge
WHERE c.analysis_id = ? AND c.value IS NOT DISTINCT FROM ?"""


def _clamping(store: Store) -> list[Finding]:
    if not _has_rows(store, "redundancy_clamping"):
        return [_row("clamp_refusal", "not run", "", "Not testable here: no clamping (`python cli.py analyze redundancy`).")]
    runs = store.sql("SELECT DISTINCT c.analysis_id, CAST(json_extract(r.settings, '$.clamp_positions') AS VARCHAR) AS pos, "
                     "r.judge, r.created_at FROM redundancy_clamping c JOIN redundancy_analyses r USING (analysis_id) "
                     "ORDER BY r.created_at")
    parts, lifts = [], {}
    for a, pos, judge, _ in runs.iter_rows():
        values = store.sql("SELECT DISTINCT value FROM redundancy_clamping WHERE analysis_id = ? AND value IS NOT NULL "
                           "ORDER BY value", [a])["value"].to_list()
        base = judged(store, CLAMP_ROWS_SQL, [a, None], judge, "refusal")
        at = {v: judged(store, CLAMP_ROWS_SQL, [a, v], judge, "refusal") for v in values}
        at = {v: c for v, c in at.items() if c is not None}
        if base is None or not at:
            continue
        v, best = max(at.items(), key=lambda kv: (kv[1].k, -kv[0]))
        parts.append(f"positions {pos}: unclamped {base.text()}, clamped to {v:g} {best.text()}")
        lifts[pos] = (best.k - base.k, judge_label(best.judge))
    if not parts:
        return [_row("clamp_refusal", "no judged clamping", "", "Not testable here: the clamping completions are not judged.")]
    moved = [p for p, (lift, _) in lifts.items() if lift > 0]
    return [_row("clamp_refusal", "; ".join(parts), "; ".join(sorted({j for _, j in lifts.values()})),
                 "Not testable here: the paper gives example completions, not a rate; here clamping adds refusals "
                 f"at positions {', '.join(moved)} only." if moved else
                 "Not testable here: the paper gives example completions, not a rate; here no clamp adds a refusal.")]


CORPORA = {"alpaca": "Alpaca", "text": "WikiText-2"}
# the paired difference to the baseline and its bootstrap 95% interval (migration 0013, analyze/costs.py::_differences)
DIFF_COLUMNS = tuple(f"ce_{corpus}_diff{end}" for corpus in CORPORA for end in ("", "_low", "_high"))


def _costs(store: Store) -> list[Finding]:
    if not _has_table(store, "costs"):
        return []
    stored = set(store.sql("SELECT column_name FROM information_schema.columns WHERE table_name = 'costs'")["column_name"])
    diffs = ", ".join(c if c in stored else f"NULL AS {c}" for c in DIFF_COLUMNS)   # a store from before 0013
    c = store.sql(f"SELECT condition, ce_alpaca, n_alpaca, ce_text, n_text, {diffs} FROM costs WHERE set_prompt_id IS NULL "
                  "AND costs_id = (SELECT costs_id FROM costs ORDER BY created_at DESC LIMIT 1)")
    base = c.filter(pl.col("condition") == "baseline")
    if base.is_empty():
        return [_row("ce_delta", "not run", "", "Not testable here: no costs analysis (`python cli.py analyze costs`).")]
    rows = list(c.filter(pl.col("condition") != "baseline").iter_rows(named=True))
    parts = [f"{row['condition']} " + " / ".join(f"{_ce_delta(row, base.row(0, named=True), corpus)} {name} "
                                                 f"(n = {row[f'n_{corpus}']})" for corpus, name in CORPORA.items())
             + " nats" for row in rows]
    return [_row("ce_delta", "; ".join(parts) + f"; {_interval_note(rows)}", "",
                 "Not testable here: the paper's Table 9 values are not known to this project.")]


def _interval_note(rows: list[dict[str, Any]]) -> str:
    """Which of the differences carry their paired bootstrap interval."""
    measured = [(row, corpus) for row in rows for corpus in CORPORA if row[f"ce_{corpus}"] is not None]
    n_ci = sum(_has_interval(row, corpus) for row, corpus in measured)
    if n_ci == 0:
        return "no interval stored"
    return "paired bootstrap 95% intervals" + ("" if n_ci == len(measured) else " where shown, none stored for the others")


def _ce_delta(row: dict[str, Any], base: dict[str, Any], corpus: str) -> str:
    """The stored paired difference with its interval; without one (an old store), row minus baseline."""
    if _has_interval(row, corpus):
        return (f"{row[f'ce_{corpus}_diff']:+.3f} "
                f"[{row[f'ce_{corpus}_diff_low']:+.3f}, {row[f'ce_{corpus}_diff_high']:+.3f}]")
    ce = row[f"ce_{corpus}"]
    return _signed(ce - base[f"ce_{corpus}"] if ce is not None and base[f"ce_{corpus}"] is not None else None)


def _has_interval(row: dict[str, Any], corpus: str) -> bool:
    return all(row[f"ce_{corpus}_diff{end}"] is not None for end in ("", "_low", "_high"))


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _taxonomy(store: Store) -> list[Finding]:
    s = taxonomy.TaxonomySettings(features="sets" if _has_rows(store, "feature_sets") else "all")
    try:
        r = taxonomy.run(store, s)
    except UsageError as err:                          # a store without feature sets: say so, keep the report
        return [_row("taxonomy_overlap", "not run", "", f"Not testable here: {err}.")]
    n_prompts = int(r.prompts["n_prompts"].sum()) if r.prompts.height else 0
    multi = int(r.multi_category.filter(pl.col("n_categories") > 1)["n_features"].sum())
    paper_n = paper_figures()["taxonomy_prompts"]["value"]
    shipped = len(taxonomy.coconot_prompts("unsafe"))
    taken = ("every one taken" if n_prompts >= shipped else
             f"{n_prompts} of them in this store (the profile's n_coconot; the default profile takes all)")
    prompts_row = _row("taxonomy_prompts", f"{n_prompts} unsafe prompts with SAE codes ({shipped} in the shipped file)", "",
                       f"Differs: the shipped CoCoNot eval file holds {shipped} unsafe prompts, {taken}, against the "
                       f"paper's {paper_n:,}." if n_prompts else "Not testable here: no CoCoNot prompts with SAE codes "
                       "(`python cli.py run` extracts them).")
    overlap = (f"{rate_text(multi, r.mapping.height)} of mapped features in more than one subcategory"
               if r.mapping.height else "no feature fires on the unsafe prompts")
    return [prompts_row, _row("taxonomy_overlap", overlap, "",
                              "Not testable here: the paper's figure is not known to this project (data/paper/figures.json).")]


def _has_rows(store: Store, table: str) -> bool:
    return _has_table(store, table) and store.sql(f'SELECT count(*) AS n FROM (SELECT 1 FROM "{table}" LIMIT 1)')["n"][0] > 0


SOURCES: tuple[Callable[[Store], list[Finding]], ...] = (_direction, _stage2, _stage3, _obrien, _hydra, _clamping, _costs,
                                                         _taxonomy)


def findings(store: Store) -> list[Finding]:
    """Every headline row, in the paper's order."""
    return [f for source in SOURCES for f in source(store)]


def findings_frame(rows: list[Finding]) -> pl.DataFrame:
    """The rows as a table for the report."""
    return pl.DataFrame([{"quantity": f.quantity, "paper": f.paper, "paper section": f.section, "ours (n, 95% CI)": f.ours,
                          "judge": f.judge, "verdict": f.verdict} for f in rows],
                        schema={c: pl.String for c in ("quantity", "paper", "paper section", "ours (n, 95% CI)",
                                                       "judge", "verdict")})
