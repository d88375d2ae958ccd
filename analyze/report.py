"""The report: one self-contained HTML file (plots inline as base64 PNG) and a Markdown twin.

Every section is an entry of SECTIONS: a title, the SQL it reads, a render function from the
query results to parts (tables, figures, notes, feature cards), the tables it needs and the
command that fills them. A section whose tables are missing or empty says "not run yet" with that
command; every table in the report carries the SQL that produced it. A later stage adds its
section by adding one entry to SECTIONS.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import matplotlib

matplotlib.use("Agg")                                  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from analyze import attribution_report, clamping, findings, rejudge, taxonomy  # noqa: E402
from analyze.judge_eval import agreement_table  # noqa: E402
from analyze.metrics import rate_ci  # noqa: E402
from analyze.cards import CardSettings, FeatureCard, cards  # noqa: E402
from store import Store, UsageError  # noqa: E402
from store.settings import Settings


# ---- parts a section renders into ---------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    frame: pl.DataFrame
    caption: str = ""
    sql: str | None = None                # the query behind it (shown in a <details> under it)
    max_rows: int = 60


@dataclass(frozen=True)
class Figure:
    png: bytes
    alt: str


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Card:
    card: FeatureCard


@dataclass(frozen=True)
class Toggle:
    """Parts folded under a summary line (HTML <details>): examples, content that needs a warning."""
    summary: str
    parts: tuple["Part", ...]


Part = Union[Table, Figure, Note, Card, Toggle]
Render = Callable[[Store, list[pl.DataFrame], tuple[str, ...], "ReportSettings"], list[Part]]


@dataclass(frozen=True)
class Section:
    title: str
    sql: tuple[str, ...] | Callable[[Store], tuple[str, ...]]   # queries whose results `render` gets, in order
    render: Render                        # (store, frames, sql, settings) -> parts
    needs: tuple[str, ...]                # tables (or prefixes ending in *) that must hold rows
    command: str                          # what fills them
    paper: str = ""                       # the paper's table / figure it reproduces


@dataclass(frozen=True)
class Rendered:
    title: str
    status: str                           # ok | not run | error
    parts: list[Part] = field(default_factory=list)
    command: str = ""
    paper: str = ""


@dataclass(frozen=True)
class ReportSettings(Settings):
    out: str | None = None                # output directory (default: <store>/report)
    max_cards: int = 24                   # feature cards shown (most frequent features of the sets)
    n_contexts: int = 6                   # contexts per card

    def __post_init__(self) -> None:
        if self.max_cards < 0 or self.n_contexts < 1:
            raise UsageError(f"max_cards must be >= 0 and n_contexts >= 1; got {self.max_cards}, {self.n_contexts}")



@dataclass(frozen=True)
class ReportResult:
    html: Path
    markdown: Path
    sections: list[tuple[str, str]]       # (title, status)


# ---- running ----------------------------------------------------------------------------------

def run(store: Store, settings: ReportSettings = ReportSettings()) -> ReportResult:
    """Write report.html and report.md for the store's contents; returns their paths and each section's status."""
    out = Path(settings.out) if settings.out else store.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    rendered = [render_section(store, s, settings) for s in SECTIONS]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"refusalscope report: {store.path.name}"
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(to_html(title, stamp, rendered), encoding="utf-8")
    md_path.write_text(to_markdown(title, stamp, rendered, out / "report_files"), encoding="utf-8")
    return ReportResult(html_path, md_path, [(r.title, r.status) for r in rendered])


def render_section(store: Store, section: Section, settings: ReportSettings) -> Rendered:
    """One section's parts, or its "not run yet" / error state."""
    meta = {"command": section.command, "paper": section.paper}
    if not all(_has_rows(store, name) for name in section.needs):
        return Rendered(section.title, "not run", **meta)
    try:
        sql = section.sql(store) if callable(section.sql) else section.sql
        frames = [with_intervals(store.sql(q)) for q in sql]
        if frames and all(f.is_empty() for f in frames):
            return Rendered(section.title, "not run", **meta)
        parts = section.render(store, frames, sql, settings)
    except Exception as err:                           # one broken section must not cost the whole report
        return Rendered(section.title, "error", [Note(f"this section failed: {type(err).__name__}: {err}")], **meta)
    return Rendered(section.title, "ok", parts, **meta)


def with_intervals(df: pl.DataFrame) -> pl.DataFrame:
    """The frame with the Wilson 95% interval of its `asr` (n_jailbroken of n_prompts, or of n_refused) as
    ci_low / ci_high right after it, where the query gives the counts but no interval."""
    if "asr" not in df.columns or "n_jailbroken" not in df.columns or "ci_low" in df.columns:
        return df
    n_col = next((c for c in ("n_prompts", "n_refused") if c in df.columns), None)
    if n_col is None:
        return df
    counts = [(int(k), int(n)) if k is not None and n is not None else None
              for k, n in zip(df["n_jailbroken"].to_list(), df[n_col].to_list())]
    return _with_wilson(df, "asr", counts, ("ci_low", "ci_high"))


def _with_wilson(df: pl.DataFrame, after: str, counts: list[tuple[int, int] | None],
                 names: tuple[str, str]) -> pl.DataFrame:
    """The frame with the Wilson 95% interval of each row's (k, n) as two columns right after `after`."""
    cis = [rate_ci(*kn) if kn else {"ci_low": None, "ci_high": None} for kn in counts]
    at = df.columns.index(after) + 1
    out = df.with_columns(pl.Series(names[0], [c["ci_low"] for c in cis], pl.Float64),
                          pl.Series(names[1], [c["ci_high"] for c in cis], pl.Float64))
    return out.select(df.columns[:at] + list(names) + df.columns[at:])


def _has_rows(store: Store, name: str) -> bool:
    pattern = name[:-1] + "%" if name.endswith("*") else name
    tables = store.sql("SELECT table_name FROM information_schema.tables WHERE table_name LIKE ?", [pattern])
    return any(store.sql(f'SELECT count(*) AS n FROM (SELECT 1 FROM "{t}" LIMIT 1)')["n"][0]
               for t in tables["table_name"])


# ---- the sections -----------------------------------------------------------------------------

SAE_QUALITY_SQL = """-- the store's trained SAEs: FVU and L0 over ordinary held-out positions (position 0 and
-- massive-norm rows excluded and measured apart), dead latents, next-token CE increase spliced in vs zeroed
SELECT model, layer, architecture, width, k, round(fvu, 3) AS fvu, round(l0, 1) AS l0,
       round(dead_frac, 4) AS dead_frac, round(ce_increase, 3) AS ce_increase,
       round(ce_zero_increase, 3) AS ce_zero_increase, round(ce_ratio, 3) AS ce_ratio,
       round(massive_rel_err, 3) AS massive_rel_err, n_train_rows, settings_hash
FROM sae_quality ORDER BY model, settings_hash, layer"""

RUNS_SQL = """SELECT run_id, model, status, n_items, n_rows,
       CASE WHEN length(CAST(intervention AS VARCHAR)) > 60
            THEN left(CAST(intervention AS VARCHAR), 57) || '...' ELSE CAST(intervention AS VARCHAR) END AS intervention,
       CAST(created_at AS VARCHAR) AS created_at
FROM runs ORDER BY created_at"""

DIRECTION_SQL = """-- the newest direction analysis of each model, one row per layer
SELECT a.model, d.direction_id, d.layer, d.selected, d.evaluated, d.n_refused,
       CAST(round(d.asr * d.n_refused) AS INTEGER) AS n_jailbroken, d.asr, d.asr_phrase,
       d.mean_p_i, d.kl_harmless, d.cos_harmful, d.cos_harmful_std, d.cos_benign, d.cos_benign_std
FROM directions d JOIN analyses a ON a.analysis_id = d.direction_id
WHERE a.created_at = (SELECT max(created_at) FROM analyses b WHERE b.kind = 'direction' AND b.model = a.model)
ORDER BY a.model, d.layer"""

STAGE1_SUMMARY_SQL = """-- prompts jailbroken by ablating the top-K candidates at some K (the smallest such K is chosen)
SELECT candidates_id, count(DISTINCT prompt_id) AS n_prompts,
       count(DISTINCT prompt_id) FILTER (WHERE chosen) AS n_jailbroken,
       avg(k) FILTER (WHERE chosen) AS mean_k, avg(n_features) FILTER (WHERE chosen) AS mean_n_features
FROM candidate_sets GROUP BY candidates_id ORDER BY candidates_id"""

STAGE1_BY_K_SQL = """SELECT candidates_id, k, count(*) AS n_evaluated, sum(jailbroken::INT) AS n_jailbroken,
       count(*) FILTER (WHERE chosen) AS n_chosen, avg(n_features) AS mean_n_features, avg(p_i) AS mean_p_i
FROM candidate_sets GROUP BY candidates_id, k ORDER BY candidates_id, k"""

STAGE2_BY_TAU_SQL = """-- ablating each prompt's stage-2 set at each tau, judged
SELECT set_id, tau, count(*) AS n_prompts, sum(jailbroken::INT) AS n_jailbroken, avg(jailbroken::INT) AS asr,
       avg(n_features) AS mean_n_features, median(n_features) AS median_n_features
FROM set_checks WHERE stage = 2 AND kind = 'set' GROUP BY set_id, tau ORDER BY set_id, tau"""

STAGE2_SELECTED_SQL = """-- the reported stage-2 set per prompt (the largest tau whose set jailbreaks)
SELECT set_id, count(*) AS n_prompts, avg(n) AS mean_set_size, stddev_samp(n) AS std_set_size, min(n) AS min_set_size,
       max(n) AS max_set_size
FROM (SELECT set_id, prompt_id, count(*) AS n FROM feature_sets WHERE stage = 2 AND selected GROUP BY set_id, prompt_id)
GROUP BY set_id ORDER BY set_id"""

FM_MODELS_SQL = """-- test_ci_low / test_ci_high: a Wilson 95% interval of test_acc over the test prompts (each prompt's n_last
-- rows count as one unit, since they are not independent: wider than an interval over rows)
SELECT model_id, kind, model, embedding, n_features, train_acc, val_acc, test_acc,
       CAST(json_extract(data, '$.n_prompts.test') AS INTEGER) AS n_test_prompts, best_epoch, mean_cosine
FROM fm_models ORDER BY created_at"""

STAGE3_ASR_SQL = """-- ASR of ablating the stage-2 set plus the top-K features ranked by the FM or the linear probe
SELECT sweep_id, ranker, k, n_prompts, n_jailbroken, asr, ci_low, ci_high FROM stage3_asr ORDER BY sweep_id, ranker, k"""

REDUNDANCY_ABLATIONS_SQL = """-- each prompt's stage-2 set, its dormant (inactive) part and its active part, ablated and judged
SELECT analysis_id, kind, count(*) AS n_prompts, sum(jailbroken::INT) AS n_jailbroken,
       avg(jailbroken::INT) AS asr, avg(n_features) AS mean_n_features
FROM redundancy_ablations GROUP BY analysis_id, kind ORDER BY analysis_id, kind"""

REDUNDANCY_PROMPTS_SQL = """SELECT analysis_id, count(*) AS n_prompts, avg(n_set) AS mean_set_size,
       avg(n_inactive / n_set) AS inactive_share, sum(kept::INT) AS n_dormant_needed
FROM redundancy_prompts GROUP BY analysis_id ORDER BY analysis_id"""

REDUNDANCY_SWITCH_ON_SQL = """-- where dormant features switch on once the active part is ablated, by token role
SELECT analysis_id, role, count(*) AS n_switch_on,
       count(*) / sum(count(*)) OVER (PARTITION BY analysis_id) AS share
FROM redundancy_switch_on GROUP BY analysis_id, role ORDER BY analysis_id, share DESC"""

CLAMPING_SQL = """-- benign prompts with the switched-on features clamped at the analysis' positions (0: the first token,
-- -1: the last prompt position; value NULL: unclamped); features_from: switched on in prompts that need them, or in
-- any prompt when none does
SELECT c.analysis_id, CAST(json_extract(r.settings, '$.clamp_positions') AS VARCHAR) AS positions,
       coalesce(json_extract_string(r.metrics, '$.clamping.source'), 'kept prompts') AS features_from,
       c.prompt_id, c.value, c.n_features, c.p_i,
       CASE WHEN length(c.completion) > 140 THEN left(c.completion, 137) || '...' ELSE c.completion END AS completion
FROM redundancy_clamping c JOIN redundancy_analyses r USING (analysis_id)
ORDER BY c.analysis_id, c.prompt_id, c.value NULLS FIRST"""

CONTROLS_SQL = """-- the prompts' reported sets vs as many randomly drawn active features (kind = random)
SELECT set_id, stage, kind, count(*) AS n_prompts, sum(jailbroken::INT) AS n_jailbroken,
       avg(jailbroken::INT) AS asr, avg(n_features) AS mean_n_features
FROM set_checks WHERE selected GROUP BY set_id, stage, kind ORDER BY set_id, stage, kind"""

OBRIEN_SQL = """-- O'Brien et al.: ablating every SAE feature active on >= k of a prompt's tokens, ASR per k over the
-- prompts refused without intervention; stage2 / random: the prune analysis' selected sets and their random control
SELECT a.model, c.controls_id, a.parent_id AS prune_id, c.kind, c.k, c.n_prompts, c.n_jailbroken, c.asr, c.ci_low,
       c.ci_high, c.mean_features
FROM control_asr c JOIN analyses a ON a.analysis_id = c.controls_id
ORDER BY a.created_at, c.controls_id, CASE c.kind WHEN 'obrien' THEN 0 WHEN 'stage2' THEN 1 ELSE 2 END, c.k"""

OBRIEN_PROMPTS_SQL = """-- features ablated per prompt at each k (the O'Brien sets), and how many prompts each k jailbreaks
SELECT controls_id, k, count(*) AS n_prompts, sum(refused_clean::INT) AS n_refused_clean,
       sum((jailbroken AND refused_clean)::INT) AS n_jailbroken, min(n_features) AS min_features,
       median(n_features) AS median_features, max(n_features) AS max_features
FROM control_results WHERE kind = 'obrien' GROUP BY controls_id, k ORDER BY controls_id, k"""

COSTS_SQL = """-- the newest costs analysis of each model (paper Table 9): CE in nats per token
SELECT c.model, c.condition, c.n_sets, c.n_features, c.ce_alpaca, c.ce_alpaca_std, c.n_alpaca,
       c.ce_text, c.ce_text_std, c.n_text
FROM costs c
WHERE c.set_prompt_id IS NULL AND c.costs_id = (SELECT costs_id FROM costs b WHERE b.model = c.model
                                                ORDER BY created_at DESC LIMIT 1)
ORDER BY c.model, CASE c.condition WHEN 'baseline' THEN 0 WHEN 'direction_ablation' THEN 1 ELSE 2 END"""

OVER_REFUSAL_SQL = """-- XSTest safe prompts judged refusal, per condition of the newest costs analysis of each model
SELECT c.model, c.condition, c.n_sets, c.over_refusal, c.over_refusal_std, c.n_xstest, c.judge
FROM costs c
WHERE c.set_prompt_id IS NULL AND c.n_xstest IS NOT NULL
  AND c.costs_id = (SELECT costs_id FROM costs b WHERE b.model = c.model ORDER BY created_at DESC LIMIT 1)
ORDER BY c.model, CASE c.condition WHEN 'baseline' THEN 0 WHEN 'direction_ablation' THEN 1 ELSE 2 END"""

TRANSFER_SQL = """-- the found interventions on held-out harmful prompts: ASR over the prompts refused without intervention
-- (Wilson 95% interval), CE on Alpaca beside the unmodified model (intervention none)
SELECT a.model, t.transfer_id, json_extract_string(a.metrics, '$.dataset') AS dataset,
       json_extract_string(a.metrics, '$.split') AS split, t.intervention, t.matched_to, t.n_features, t.n_prompts,
       t.n_refused, t.n_jailbroken, t.asr, t.ci_low, t.ci_high, t.ce_alpaca,
       t.ce_alpaca - max(CASE WHEN t.intervention = 'none' THEN t.ce_alpaca END)
           OVER (PARTITION BY t.transfer_id) AS ce_delta
FROM transfer_results t JOIN analyses a ON a.analysis_id = t.transfer_id
ORDER BY a.created_at, t.transfer_id,
         CASE t.intervention WHEN 'none' THEN 0 WHEN 'direction' THEN 1 ELSE 2 END, t.matched_to NULLS FIRST"""


PAIRED_SQL = """-- two conditions judged on the same prompts: the 2x2 table of jailbroken flags (a_only, b_only: the
-- discordant pairs), the two-sided exact McNemar p and ASR(a) - ASR(b) with Newcombe's paired 95% interval
SELECT an.kind AS analysis, p.analysis_id, p.a, p.b, p.k, p.n_pairs, p.n_both, p.n_a_only, p.n_b_only, p.n_neither,
       p.p_value, p.diff, p.diff_low, p.diff_high
FROM paired_tests p JOIN analyses an USING (analysis_id)
ORDER BY an.created_at, p.analysis_id, p.a, p.b, p.k"""


CARD_FEATURES_SQL = """-- the features of the stage-2 and stage-3 sets, most frequent first
SELECT layer, feature, count(DISTINCT prompt_id) AS n_prompts, min(stage) AS stage
FROM feature_sets WHERE selected AND stage >= 2
GROUP BY layer, feature ORDER BY n_prompts DESC, layer, feature"""


def _tables(store: Store, frames: list[pl.DataFrame], sql: tuple[str, ...], captions: tuple[str, ...] = ()) -> list[Part]:
    return [Table(f, captions[k] if k < len(captions) else "", sql[k]) for k, f in enumerate(frames)]


def _render_runs(store, frames, sql, settings):
    return _tables(store, frames, sql)


def _render_cosine(store, frames, sql, settings):
    df = frames[0].filter(pl.col("cos_harmful").is_not_null())
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (model,), g in df.group_by(["model"], maintain_order=True):
        for name, color in (("harmful", "tab:red"), ("benign", "tab:blue")):
            x, mean, std = g["layer"].to_numpy(), g[f"cos_{name}"].to_numpy(), g[f"cos_{name}_std"].fill_null(0).to_numpy()
            ax.plot(x, mean, color=color, label=f"{model} {name}")
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
        best = g.filter(pl.col("selected"))["layer"]
        if best.len():
            ax.axvline(int(best[0]), color="gray", linestyle=":", label=f"{model} l* = {int(best[0])}")
    ax.set(xlabel="layer", ylabel="cos(residual, r at l*)", title="Cosine with the refusal direction, last token")
    ax.legend(fontsize=8)
    cols = ["model", "layer", "selected", "cos_harmful", "cos_harmful_std", "cos_benign", "cos_benign_std"]
    return [_figure(fig, "cosine by layer"), Table(df.select(cols), "mean ± std over val prompts", sql[0])]


def _render_asr(store, frames, sql, settings):
    df = frames[0].filter(pl.col("evaluated"))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (model,), g in df.group_by(["model"], maintain_order=True):
        asr = g["asr"].to_numpy()
        err = np.stack([asr - g["ci_low"].to_numpy(), g["ci_high"].to_numpy() - asr])
        ax.errorbar(g["layer"].to_numpy(), asr, yerr=err, marker="o", capsize=3, label=f"{model} ASR (Wilson 95%)")
        ax.plot(g["layer"].to_numpy(), g["asr_phrase"].to_numpy(), marker=".", linestyle="--", label=f"{model} ASR (phrase judge)")
    ax.set(xlabel="layer of the direction", ylabel="attack success rate", ylim=(0, 1.02),
           title="Directional ablation (every layer) of each layer's direction")
    ax.legend(fontsize=8)
    cols = ["model", "layer", "selected", "n_refused", "n_jailbroken", "asr", "ci_low", "ci_high", "asr_phrase",
            "mean_p_i", "kl_harmless"]
    return [_figure(fig, "ASR per layer"), Table(df.select(cols), "", sql[0])]


def _render_stage1(store, frames, sql, settings):
    by_k = frames[1]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for (cid,), g in by_k.filter(pl.col("k") > 0).group_by(["candidates_id"], maintain_order=True):
        ax.plot(g["k"].to_numpy(), g["n_chosen"].cum_sum().to_numpy(), marker="o", label=cid)
    ax.set(xlabel="K (top latents per layer)", ylabel="prompts jailbroken at <= K", title="Stage 1: candidate sets")
    ax.legend(fontsize=8)
    return [*_tables(store, frames[:1], sql[:1], ("per analysis",)), _figure(fig, "stage 1 by K"),
            Table(by_k, "per K", sql[1])]


def _render_stage3(store, frames, sql, settings):
    asr = frames[1]
    counts = [(round(a * n), n) if a is not None and n else None
              for a, n in zip(frames[0]["test_acc"].to_list(), frames[0]["n_test_prompts"].to_list())]
    models = _with_wilson(frames[0], "test_acc", counts, ("test_ci_low", "test_ci_high"))
    parts: list[Part] = [Table(models, "fitted classifiers", sql[0])]
    if asr.height:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for (sweep, ranker), g in asr.group_by(["sweep_id", "ranker"], maintain_order=True):
            y = g["asr"].to_numpy()
            err = np.stack([y - g["ci_low"].to_numpy(), g["ci_high"].to_numpy() - y]) if g.height < 30 else None
            ax.errorbar(g["k"].to_numpy(), y, yerr=err, marker="o" if g.height < 30 else None, capsize=3,
                        label=f"{ranker} ({sweep}), Wilson 95%")
        ax.set(xlabel="K (features added to the stage-2 set)", ylabel="ASR", ylim=(0, 1.02), title="Stage 3: FM vs linear probe")
        ax.legend(fontsize=8)
        parts.append(_figure(fig, "stage 3 ASR by K"))
    return parts + [Table(asr, "ASR per K", sql[1])]


def _render_obrien(store, frames, sql, settings):
    df = frames[0]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for k, ((cid,), g) in enumerate(df.group_by(["controls_id"], maintain_order=True)):
        color = f"C{k}"
        curve = g.filter(pl.col("kind") == "obrien")
        ax.plot(curve["k"].to_numpy(), curve["asr"].to_numpy(), marker="o", color=color, label=f"O'Brien ({cid})")
        for kind, style in (("stage2", "-."), ("random", ":")):
            level = g.filter(pl.col("kind") == kind)["asr"]
            if level.len() and level[0] is not None:
                ax.axhline(level[0], color=color, linestyle=style, label=f"{kind} ({cid})")
    ax.set(xlabel="k (features active on >= k prompt tokens ablated)", ylabel="ASR", ylim=(-0.02, 1.02),
           title="Controls: O'Brien et al. baseline vs stage-2 sets and random features")
    ax.legend(fontsize=8)
    return [_figure(fig, "O'Brien ASR by k"), Table(df, "ASR per k, beside the stage-2 sets and their random control",
                                                    sql[0]),
            Table(frames[1], "features ablated per prompt", sql[1])]


def _render_costs(store, frames, sql, settings):
    df = frames[0]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, corpus, title in ((axes[0], "alpaca", "Alpaca (instruction tokens)"), (axes[1], "text", "WikiText-2 eval")):
        labels = [f"{m}\n{c}" if df["model"].n_unique() > 1 else c for m, c in zip(df["model"], df["condition"])]
        ax.bar(range(df.height), df[f"ce_{corpus}"].fill_null(0).to_numpy(),
               yerr=df[f"ce_{corpus}_std"].fill_null(0).to_numpy(), color="tab:gray", capsize=4)
        ax.set_xticks(range(df.height), [lab.replace("_", "\n") for lab in labels], fontsize=7)
        ax.set(title=title, ylabel="CE (nats / token)")
    fig.tight_layout()
    return [Table(df, "feature ablation: mean ± std over the per-prompt sets", sql[0]), _figure(fig, "CE loss")]


SWITCH_ON_POSITIONS_SQL = """-- where the backups switch on, counted from the end of the prompt (-1: the last prompt token)
SELECT s.analysis_id, s.role, s.pos - i.n_tokens AS position_from_end, count(*) AS n_switch_on,
       count(*) / sum(count(*)) OVER (PARTITION BY s.analysis_id) AS share
FROM redundancy_switch_on s JOIN items i ON i.run_id = s.run_id AND i.item = s.item
GROUP BY s.analysis_id, s.role, s.pos - i.n_tokens ORDER BY s.analysis_id, n_switch_on DESC, position_from_end"""


def _render_clamping(store, frames, sql, settings):
    clamped, where = frames
    values = sorted({float(v) for v in clamped["value"].drop_nulls()})
    layers = sorted({int(l) for l in store.sql("SELECT DISTINCT layer FROM redundancy_switch_on")["layer"]})
    scale = clamping.clamp_scale(store, layers, values)
    parts: list[Part] = [Table(clamped, "completions per clamp value (value empty: unclamped)", sql[0]),
                         Table(where, "where the backups switch on", sql[1])]
    if scale.height:
        parts += [Note("Clamp values against the residual: position 0 is a massive-activation sink the SAEs never saw, "
                       "so a clamp of 2..10 there is a few thousandths of its norm; at the last prompt position, where "
                       "the backups mostly switch on, the same values are a sizeable share of it "
                       "(`python cli.py analyze redundancy --clamp-positions=-1` clamps there)."),
                  Table(scale, "median residual norm per layer of the switched-on features (stored unablated rows), and "
                        "each clamp value over it", clamping.SCALE_ROWS_SQL)]
    return parts


def _render_taxonomy(store, frames, sql, settings):
    mapping, per_category, multi, prompts = frames
    shipped = len(taxonomy.coconot_prompts("unsafe"))
    note = Note(f"CoCoNot's unsafe requests ('{taxonomy.UNSAFE_CATEGORY}') by harm subcategory, as the paper's Fig. 3: "
                f"{int(prompts['n_prompts'].sum()) if prompts.height else 0} of them with SAE codes in this store; the "
                f"shipped eval file holds {shipped}, every one taken by the default profile, against the paper's "
                f"{taxonomy.PAPER_N_UNSAFE:,} (its train split is not shipped). wildchats and incomprehensible are "
                "filed under the same category in the eval file and are shown as their own rows.")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    axes[0].barh(per_category["category"].to_list()[::-1], per_category["n_features"].to_list()[::-1], color="tab:purple")
    axes[0].set(xlabel="features", title="Features per CoCoNot harm subcategory")
    axes[0].tick_params(axis="y", labelsize=7)
    axes[1].bar(multi["n_categories"].cast(pl.String).to_list(), multi["n_features"].to_list(), color="tab:olive")
    axes[1].set(xlabel="subcategories per feature", ylabel="features", title="Multi-subcategory features")
    fig.tight_layout()
    shown = mapping.with_columns(pl.col("categories").list.join("; "))
    return [note, _figure(fig, "taxonomy"), Table(prompts, "prompts per subcategory in the store", sql[3]),
            Table(per_category, "features per subcategory", sql[1]),
            Table(multi, "features by number of categories", sql[2]),
            Table(shown, "each feature's categories (with its imported explanation)", sql[0], max_rows=40)]


def _taxonomy_sql(store: Store) -> tuple[str, ...]:
    has_sets = _has_rows(store, "feature_sets")
    q = taxonomy.taxonomy_sql(taxonomy.TaxonomySettings(features="sets" if has_sets else "all"))
    return q["mapping"], q["per_category"], q["multi_category"], q["prompts"]


def _render_cards(store: Store, frames: list[pl.DataFrame], sql: tuple[str, ...], settings: ReportSettings) -> list[Part]:
    wanted = frames[0].head(settings.max_cards)
    found = cards(store, [(int(l), int(f)) for l, f in wanted.select("layer", "feature").iter_rows()],
                  CardSettings(n_contexts=settings.n_contexts))
    parts: list[Part] = [Table(wanted, f"the {wanted.height} most frequent features of the sets", CARD_FEATURES_SQL)]
    if not found:
        parts.append(Note("none of these features fires in the store's unablated runs with SAE activations"))
    return parts + [Card(c) for c in found]


def _generic(store, frames, sql, settings):
    return _tables(store, frames, sql)


FINDINGS_SQL = """-- the findings are read by analyze/findings.py (one query per row, newest analysis of each kind);
-- this lists the analyses they come from
SELECT kind, analysis_id, model, judge, CAST(created_at AS VARCHAR) AS created_at FROM analyses a
WHERE created_at = (SELECT max(created_at) FROM analyses b WHERE b.kind = a.kind) ORDER BY created_at"""


def _render_findings(store: Store, frames: list[pl.DataFrame], sql: tuple[str, ...],
                     settings: ReportSettings) -> list[Part]:
    best = findings.best_judge()
    judges = ", ".join(findings.judge_label(j) for j in sorted(set(frames[0]["judge"].drop_nulls())))
    return [Note(f"Judge: every rate below is judged by the best measured judge, {best.text()}, where the store "
                 f"holds its verdicts for every counted item (`python cli.py judge rerun --judge {best.name}`); "
                 f"otherwise by the stage's own judge, named in the row. The analyses here were judged by: {judges}. "
                 "Rates carry a Wilson 95% interval and their counts."),
            Table(findings.findings_frame(findings.findings(store)),
                  "the paper's headline figures (data/paper/figures.json, with their sections) beside ours", None,
                  max_rows=100),
            Note("Verdict rule: a paper rate inside our interval reproduces, outside it differs; where the paper's "
                 "number is not known to this project, or a stage has not run, the row is not testable here and says why."),
            Table(frames[0], "the analyses the rows read", sql[0])]


def _examples_sql(store: Store) -> tuple[str, ...]:
    from analyze.judges import get_judge
    best = get_judge(findings.best_judge().name).judge_id
    return (f"""-- up to 3 prompts per stage: the prompt, its clean (unablated) completion, the completion under the stage's
-- ablation, the stage's verdict and the best judge's ({best}) where it judged the item
WITH ablated AS (
    SELECT 'stage 1' AS stage, 'top-' || k || ' candidates per layer' AS ablation, prompt_id, run_id, item, n_features,
           verdict FROM candidate_sets WHERE chosen
    UNION ALL SELECT 'stage 2', 'pruned set, tau ' || round(tau, 2), prompt_id, run_id, item, n_features, verdict
    FROM set_checks WHERE stage = 2 AND selected AND kind = 'set'
    UNION ALL SELECT 'stage 3', 'set + FM top-' || k, prompt_id, run_id, item, n_ablated, verdict
    FROM stage3_outcomes WHERE ranker = 'fm'
    UNION ALL SELECT 'O''Brien et al.', 'active on >= ' || k || ' tokens', prompt_id, run_id, item, n_features, verdict
    FROM control_results WHERE kind = 'obrien'
),
one AS (   -- per stage and prompt, its jailbreak with the fewest features if any, else its smallest ablation
    SELECT * FROM ablated
    QUALIFY row_number() OVER (PARTITION BY stage, prompt_id ORDER BY (verdict = 'compliance') DESC, n_features) = 1
),
clean AS (
    SELECT i.prompt_id, arg_min(i.completion, r.created_at) AS clean_completion
    FROM items i JOIN runs r ON r.run_id = i.run_id AND r.status = 'complete'
    JOIN interventions s ON s.spec_hash = i.spec_hash
    WHERE s.spec = '{{}}' AND i.completion IS NOT NULL GROUP BY i.prompt_id
)
SELECT o.stage, o.ablation, p.text AS prompt, left(c.clean_completion, 300) AS clean_completion, o.n_features,
       left(i.completion, 300) AS ablated_completion, o.verdict, j.verdict AS best_judge_verdict
FROM one o JOIN prompts p ON p.prompt_id = o.prompt_id
JOIN items i ON i.run_id = o.run_id AND i.item = o.item AND i.completion IS NOT NULL
LEFT JOIN clean c ON c.prompt_id = o.prompt_id
LEFT JOIN judgements j ON j.run_id = o.run_id AND j.item = o.item AND j.judge = '{best}'
QUALIFY row_number() OVER (PARTITION BY o.stage ORDER BY (o.verdict = 'compliance') DESC, o.prompt_id) <= 3
ORDER BY o.stage, o.prompt_id""",)


def _render_examples(store: Store, frames: list[pl.DataFrame], sql: tuple[str, ...],
                     settings: ReportSettings) -> list[Part]:
    return [Toggle("Show the examples (content warning: harmful requests and model completions)",
                   (Table(frames[0], "a few prompts per stage, clean and ablated (completions cut at 300 characters)",
                          sql[0]),))]


# The report's sections, in order: a new stage adds its entry here.
def _render_agreement(store: Store, frames: list[pl.DataFrame], sql: tuple[str, ...],
                      settings: ReportSettings) -> list[Part]:
    rows, examples = [], []
    for (a, b), part in frames[0].group_by("judge_a", "judge_b", maintain_order=True):
        t = agreement_table({a: part["verdict_a"].to_list(), b: part["verdict_b"].to_list()})
        (_, rate_a), (_, rate_b) = t.compliance
        rows.append({"judge_a": a, "judge_b": b, "n": t.n, "kappa": round(t.pairs[0].kappa, 3),
                     "agree": t.pairs[0].agree.text(), "compliance_a": rate_a.text(), "compliance_b": rate_b.text()})
        examples.append(part.filter(pl.col("verdict_a") != pl.col("verdict_b")).head(5)
                        .select("judge_a", "judge_b", "verdict_a", "verdict_b", "prompt", "completion"))
    return [Table(pl.DataFrame(rows), "kappa and the share each judge calls compliance (what ASR counts), same items",
                  sql[0]), Table(pl.concat(examples), "where they disagree: up to 5 examples per pair")]


SECTIONS: list[Section] = [
    Section("Findings: the paper's headline figures beside ours", (FINDINGS_SQL,), _render_findings, ("analyses",),
            "python cli.py run (or the analyze stages)", "every headline figure, data/paper/figures.json"),
    Section("Examples: clean and ablated completions", _examples_sql, _render_examples, ("items",),
            "python cli.py analyze candidates (and the later stages)"),
    Section("SAE quality (held-out text, ordinary positions)", (SAE_QUALITY_SQL,), _generic, ("sae_quality",),
            "python cli.py sae train"),
    Section("Refusal direction: cosine by layer", (DIRECTION_SQL,), _render_cosine, ("directions",),
            "python cli.py analyze direction", "Fig. 4/5"),
    Section("Directional ablation: ASR per layer", (DIRECTION_SQL,), _render_asr, ("directions",),
            "python cli.py analyze direction"),
    Section("Stage 1: candidate sets (jailbreaks by K)", (STAGE1_SUMMARY_SQL, STAGE1_BY_K_SQL), _render_stage1,
            ("candidate_sets",), "python cli.py analyze candidates"),
    Section("Stage 2: pruned sets (jailbreaks by tau)", (STAGE2_BY_TAU_SQL, STAGE2_SELECTED_SQL), _generic,
            ("feature_sets",), "python cli.py analyze prune"),
    Section("Stage 3: FM vs linear probe", (FM_MODELS_SQL, STAGE3_ASR_SQL), _render_stage3, ("fm_models",),
            "python cli.py analyze stage3"),
    Section("Redundancy: dormant features and where they switch on",
            (REDUNDANCY_PROMPTS_SQL, REDUNDANCY_ABLATIONS_SQL, REDUNDANCY_SWITCH_ON_SQL), _generic,
            ("redundancy_prompts",), "python cli.py analyze redundancy"),
    Section("Clamping switched-on features (the first token, and where they switch on)",
            (CLAMPING_SQL, SWITCH_ON_POSITIONS_SQL), _render_clamping, ("redundancy_clamping",),
            "python cli.py analyze redundancy (--clamp-positions=-1: where the backups switch on)"),
    Section("Controls: random active features", (CONTROLS_SQL,), _generic, ("set_checks",),
            "python cli.py analyze prune"),
    Section("Controls: O'Brien et al. baseline (features active on >= k tokens)", (OBRIEN_SQL, OBRIEN_PROMPTS_SQL),
            _render_obrien, ("control_asr",), "python cli.py analyze controls"),
    Section("Paired tests: two conditions on the same prompts (McNemar exact, Newcombe interval)", (PAIRED_SQL,),
            _generic, ("paired_tests",), "python cli.py analyze prune / controls / stage3"),
    Section("Costs: cross-entropy loss", (COSTS_SQL,), _render_costs, ("costs",), "python cli.py analyze costs",
            "Table 9"),
    Section("Over-refusal on XSTest safe prompts", (OVER_REFUSAL_SQL,), _generic, ("costs",),
            "python cli.py analyze costs"),
    Section("Transfer: the found interventions on held-out harmful prompts", (TRANSFER_SQL,), _generic,
            ("transfer_results",), "python cli.py analyze transfer"),
    Section("Taxonomy: features by CoCoNot harm subcategory (unsafe requests)", _taxonomy_sql, _render_taxonomy, ("sae_acts",),
            "python cli.py extract --dataset coconot --limit 0 (with SAEs), then python cli.py analyze taxonomy",
            "Fig. 3"),
    Section("Beyond the paper: gradient attribution vs real ablations", attribution_report.SQL,
            attribution_report.render, ("attribution_checks",), "python cli.py analyze attribution"),
    Section("Feature cards", (CARD_FEATURES_SQL,), _render_cards, ("feature_sets",),
            "python cli.py analyze prune (cards show the features of the stage-2 and stage-3 sets)"),
    Section("Judges: agreement on the same completions", (rejudge.PAIRS_SQL,), _render_agreement, ("judgements",),
            "python cli.py judge rerun --judge rubric (any two judges of the same runs)"),
    Section("Runs in the store", (RUNS_SQL,), _render_runs, ("runs",), "python cli.py extract"),
]


# ---- writing: HTML ----------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}.notrun{color:#888;font-style:italic}
.error{color:#a00}.paper{color:#666;font-size:.9em}.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;
margin:.8em 0}.card h3{margin:.2em 0;font-size:1em}td.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap}
mark{background:#ffd54f;font-weight:bold}details.toggle>summary{cursor:pointer;font-weight:bold;color:#a33}img{max-width:100%}nav li{margin:.1em 0}caption{text-align:left;color:#555}"""


def to_html(title: str, stamp: str, rendered: list[Rendered]) -> str:
    """The whole report as one HTML page: no external asset, images as data URIs."""
    esc = html.escape
    toc = "".join(f'<li><a href="#s{k}">{esc(r.title)}</a> <small>({esc(r.status)})</small></li>'
                  for k, r in enumerate(rendered))
    body = [f"<h1>{esc(title)}</h1><p>generated {esc(stamp)}</p><nav><ol>{toc}</ol></nav>"]
    for k, r in enumerate(rendered):
        body.append(f'<section id="s{k}"><h2>{esc(r.title)}</h2>')
        if r.paper:
            body.append(f'<p class="paper">paper: {esc(r.paper)}</p>')
        if r.status == "not run":
            body.append(f'<p class="notrun">not run yet: <code>{esc(r.command)}</code></p>')
        for j, part in enumerate(r.parts):
            body.append(_html_part(part, f"s{k}-{j}", r.status))
        body.append("</section>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def _html_part(part: Part, anchor: str, status: str) -> str:
    esc = html.escape
    if isinstance(part, Note):
        return f'<p class="{"error" if status == "error" else "note"}">{esc(part.text)}</p>'
    if isinstance(part, Figure):
        data = base64.b64encode(part.png).decode()
        return f'<p><img alt="{esc(part.alt)}" src="data:image/png;base64,{data}"></p>'
    if isinstance(part, Table):
        return _html_table(part.frame, part.caption, part.sql, anchor, part.max_rows)
    if isinstance(part, Toggle):
        inner = "".join(_html_part(p, f"{anchor}-{k}", status) for k, p in enumerate(part.parts))
        return f'<details class="toggle"><summary>{esc(part.summary)}</summary>{inner}</details>'
    return _html_card(part.card, anchor)


def _html_table(df: pl.DataFrame, caption: str, sql: str | None, anchor: str, max_rows: int) -> str:
    esc = html.escape
    link = f' <a href="#sql-{anchor}">SQL</a>' if sql else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for row in df.head(max_rows).iter_rows():
        rows.append("<tr>" + "".join(f'<td class="n">{esc(_cell(v))}</td>' if _is_number(v) else f"<td>{esc(_cell(v))}</td>"
                                     for v in row) + "</tr>")
    more = f"<p><small>{df.height - max_rows} more rows not shown</small></p>" if df.height > max_rows else ""
    cap = f"<caption>{esc(caption)}{link}</caption>" if caption or link else ""
    details = (f'<details id="sql-{anchor}"><summary>SQL</summary><pre>{esc(sql)}</pre></details>' if sql else "")
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}{details}"


def _html_card(c: FeatureCard, anchor: str) -> str:
    esc = html.escape
    expl = f" &mdash; {esc(c.explanation)}" if c.explanation else ""
    datasets = ", ".join(f"{esc(str(d))} {a}/{n}" for d, a, n in _dataset_totals(c).iter_rows())
    rows = "".join(f'<tr><td class="n">{x.value:.3g}</td><td>{esc(x.dataset)}</td><td class="ctx">{esc(x.left)}'
                   f"<mark>{esc(x.token)}</mark>{esc(x.right)}</td></tr>" for x in c.contexts)
    sql = "".join(f"<details><summary>SQL: {esc(k)}</summary><pre>{esc(v)}</pre></details>" for k, v in c.sql.items())
    return (f'<div class="card" id="card-{c.layer}-{c.feature}"><h3>feature {c.name}{expl}</h3>'
            f"<p>density {c.density:.4f} ({c.n_active} of {c.n_rows} stored rows), {c.n_prompts} prompts, "
            f"max {c.max_value:.3g}, mean {c.mean_value:.3g}; prompts per dataset: {datasets}</p>"
            f"<table><thead><tr><th>activation</th><th>dataset</th><th>context</th></tr></thead><tbody>{rows}</tbody>"
            f"</table>{sql}</div>")


def _dataset_totals(c: FeatureCard) -> pl.DataFrame:
    return c.datasets.group_by("dataset", maintain_order=True).agg(pl.col("n_active_prompts").sum(), pl.col("n_prompts").sum())


# ---- writing: Markdown ------------------------------------------------------------------------

def to_markdown(title: str, stamp: str, rendered: list[Rendered], files: Path) -> str:
    """The report as Markdown; figures are written as PNG files under `files`."""
    out = [f"# {title}", "", f"generated {stamp}", ""]
    n_fig = 0
    for r in rendered:
        out += [f"## {r.title}", ""]
        if r.paper:
            out += [f"paper: {r.paper}", ""]
        if r.status == "not run":
            out += [f"*not run yet: `{r.command}`*", ""]
        for part in r.parts:
            lines, n_fig = _md_part(part, files, n_fig)
            out += lines
    return "\n".join(out) + "\n"


def _md_part(part: Part, files: Path, n_fig: int) -> tuple[list[str], int]:
    """One part's Markdown lines, and the figure count after it (figures are numbered files)."""
    if isinstance(part, Figure):
        files.mkdir(parents=True, exist_ok=True)
        n_fig += 1
        (files / f"figure-{n_fig}.png").write_bytes(part.png)
        return [f"![{part.alt}]({files.name}/figure-{n_fig}.png)", ""], n_fig
    if isinstance(part, Note):
        return [part.text, ""], n_fig
    if isinstance(part, Table):
        return _md_table(part.frame, part.max_rows, part.caption) + _md_sql(part.sql), n_fig
    if isinstance(part, Toggle):
        lines = [f"<details><summary>{html.escape(part.summary)}</summary>", ""]
        for inner in part.parts:
            more, n_fig = _md_part(inner, files, n_fig)
            lines += more
        return lines + ["</details>", ""], n_fig
    return _md_card(part.card), n_fig


def _md_table(df: pl.DataFrame, max_rows: int, caption: str) -> list[str]:
    def cell(v: Any) -> str:
        return _cell(v).replace("|", "\\|").replace("\n", " ")
    lines = [f"*{caption}*", ""] if caption else []
    lines += ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.head(max_rows).iter_rows()]
    if df.height > max_rows:
        lines.append(f"\n{df.height - max_rows} more rows not shown")
    return lines + [""]


def _md_sql(sql: str | None) -> list[str]:
    return ["<details><summary>SQL</summary>", "", "```sql", sql, "```", "", "</details>", ""] if sql else []


def _md_card(c: FeatureCard) -> list[str]:
    expl = f" — {c.explanation}" if c.explanation else ""
    datasets = ", ".join(f"{d} {a}/{n}" for d, a, n in _dataset_totals(c).iter_rows())
    lines = [f"### feature {c.name}{expl}", "",
             f"density {c.density:.4f} ({c.n_active} of {c.n_rows} stored rows), {c.n_prompts} prompts, "
             f"max {c.max_value:.3g}; prompts per dataset: {datasets}", "",
             "| activation | dataset | context |", "|---|---|---|"]
    for x in c.contexts:
        text = f"{x.left}**{x.token}**{x.right}".replace("\n", "↵").replace("|", "\\|")
        lines.append(f"| {x.value:.3g} | {x.dataset} | {text} |")
    lines.append("")
    for name, sql in c.sql.items():
        lines += _md_sql(sql)
    return lines


# ---- helpers ----------------------------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _figure(fig, alt: str) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Figure(buf.getvalue(), alt)


def summary_line(r: ReportResult) -> str:
    """One line: how many sections have results, and where the report is."""
    n_ok = sum(status == "ok" for _, status in r.sections)
    return f"{n_ok} of {len(r.sections)} sections have results: {r.html}"


def detail_lines(r: ReportResult) -> list[str]:
    """The sections without results, and both files."""
    return [f"  {status}: {title}" for title, status in r.sections if status != "ok"] + [
        f"report: {r.html}", f"markdown: {r.markdown}"]
