"""What an intervention costs: cross-entropy on Alpaca and WikiText-2 (paper Table 9), over-refusal on XSTest.

Conditions: the unmodified model, directional ablation of the store's refusal direction (every
layer and position), and zero-ablation of each per-prompt feature set (stage 2 by default),
reported as the mean and standard deviation over the sets.

Cross-entropy, in nats per token, token-weighted over a sample set (`items.ce_loss` x `n_loss_tokens`):
- Alpaca: the shipped Alpaca has instructions only (no reference responses), so the loss is the
  model's next-token CE on the instruction tokens of the chat-formatted prompt (the user-role
  tokens, each predicted from everything before it, template included): on-distribution text for
  a chat model that every intervention sees identically. 100 prompts of Alpaca's test split.
- General text: the paper uses The Pile; here WikiText-2's held-out part (`load_texts(part="eval")`,
  the articles the SAE trainer does not see), cut into windows of `window` tokens, `n_text` of them
  drawn with the seed, as raw text (no template; BOS first for models that have one).
Over-refusal: XSTest's 250 safe prompts, greedy completions, share judged "refusal" (analyze.judges).
Under feature ablation, prompt j gets set j mod n_sets (one pass, not n_sets passes); the rate is
pooled over all prompts and its std is over the per-set rates; its Wilson 95% interval is over the
pooled prompts.
Uncertainty (issue 15): every condition is measured on the same prompts and windows as the baseline,
so its CE difference to the baseline (`ce_*_diff`: for feature ablation the mean over sets of each
set's difference) gets a paired percentile-bootstrap 95% interval, prompts (windows) resampled
together across the baseline and every set (`ce_*_diff_low`, `ce_*_diff_high`; seeded by `seed`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import polars as pl

from analyze import catalog
from analyze.common import Feature, Log, ablation, model_key, no_log, split_prompts
from analyze.judges import Judge, get_judge, judge_run
from extract.datasets import Prompt, load_prompts, text_windows
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef, extract, make_items
from store import Store, UsageError
from store.store import code_version
from analyze.settings import JudgedPromptSettings
from analyze.metrics import bootstrap_paired_mean_diff, rate_ci, rate_text
from analyze.text import fmt, frame_text

CONDITIONS = ("baseline", "direction_ablation", "feature_ablation")
TEXT_DATASET = "wikitext2-eval"
LOSS_BATCH_SIZE = 8           # rows per loss forward: CE needs logits at every position, [batch, seq, vocab]


@dataclass(frozen=True)
class CostsSettings(JudgedPromptSettings):
    n_alpaca: int = 100                   # paper: 100 Alpaca samples
    n_text: int = 100                     # paper: 100 Pile samples; here WikiText-2 eval windows
    window: int = 128                     # tokens per general-text window
    n_xstest: int = 250                   # XSTest safe prompts for over-refusal (0: skip)
    stage: int = 2                        # which per-prompt feature sets to ablate (max_prompts: the first N)
    conditions: tuple[str, ...] = CONDITIONS
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_alpaca", "n_text", "n_xstest"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.window < 2:
            raise UsageError(f"window must be >= 2, got {self.window}")
        if self.n_xstest and self.generate < 1:
            raise UsageError("over-refusal needs completions: generate must be >= 1 (or n_xstest = 0)")
        unknown = set(self.conditions) - set(CONDITIONS)
        if unknown or not self.conditions:
            raise UsageError(f"conditions must be among {', '.join(CONDITIONS)}; got {list(self.conditions)}")
        if self.stage not in (1, 2, 3):
            raise UsageError(f"stage must be 1, 2 or 3, got {self.stage}")


@dataclass(frozen=True)
class CostsResult:
    costs_id: str
    table: pl.DataFrame                   # one row per condition that ran (the `costs` rows, set_prompt_id NULL)
    per_set: pl.DataFrame                 # feature ablation: one row per set
    skipped: dict[str, str]               # condition -> why it did not run


@dataclass(frozen=True)
class _Condition:
    name: str
    specs: list[Intervention]             # one per set (baseline and direction: one)
    set_ids: list[str | None]             # the prompt whose set each spec ablates


def run(store: Store, model: LoadedModel, saes: Sequence[SaeRef], settings: CostsSettings,
        direction: Sequence[float] | None = None,
        feature_sets: Mapping[str, Sequence[Feature]] | None = None,
        judge: Judge | None = None, log: Log = no_log, sets_from: str | None = None) -> CostsResult:
    """CE loss and over-refusal per condition, stored in `costs` (direction and sets default to the store's).

    `sets_from`: the analysis that found `feature_sets`; its position-0 rule is how they are ablated."""
    judge = judge or get_judge(settings.judge)
    conditions, skipped = _conditions(store, model, settings, direction, feature_sets, sets_from)
    if not conditions:
        raise UsageError("nothing to measure: " + "; ".join(f"{c}: {why}" for c, why in skipped.items()))
    costs_id = _costs_id(model_key(model), settings, conditions, judge.judge_id)
    samples = _samples(model, settings)
    rows = []
    for cond in conditions:
        log(f"costs: {cond.name} ({len(cond.specs)} intervention{'s' if len(cond.specs) > 1 else ''})")
        rows += _measure(store, model, saes, settings, cond, samples, judge, log)
    _differences(store, rows, settings)
    frame = _frame(costs_id, model.name, settings, judge.judge_id, rows)
    _save(store, costs_id, frame)
    return CostsResult(costs_id, frame.filter(pl.col("set_prompt_id").is_null()),
                       frame.filter(pl.col("set_prompt_id").is_not_null()), skipped)


# ---- inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Samples:
    alpaca: list[Prompt]
    text: list[Prompt]
    xstest: list[Prompt]


def _samples(model: LoadedModel, settings: CostsSettings) -> _Samples:
    alpaca = split_prompts("alpaca", "test", settings.n_alpaca, settings.seed) if settings.n_alpaca else []
    text = text_windows(model.tokenizer, settings.n_text, settings.window, settings.seed) if settings.n_text else []
    xstest = load_prompts("xstest-safe", limit=settings.n_xstest, seed=settings.seed) if settings.n_xstest else []
    return _Samples(alpaca, text, xstest)


def _conditions(store: Store, model: LoadedModel, settings: CostsSettings, direction: Sequence[float] | None,
                feature_sets: Mapping[str, Sequence[Feature]] | None,
                sets_from: str | None = None) -> tuple[list[_Condition], dict[str, str]]:
    out, skipped = [], {}
    if "baseline" in settings.conditions:
        out.append(_Condition("baseline", [Intervention()], [None]))
    if "direction_ablation" in settings.conditions:
        vector = tuple(float(x) for x in direction) if direction is not None else catalog.newest_direction(store, model.name)
        if vector is None:
            skipped["direction_ablation"] = (f"no refusal direction for {model.name} in the store; run "
                                             f"`python cli.py analyze direction --model {model.name}`")
        else:
            out.append(_Condition("direction_ablation", [Intervention(direction_ablate=vector)], [None]))
    if "feature_ablation" in settings.conditions:
        if feature_sets is None:
            sets_from, feature_sets = catalog.newest_feature_sets_of(store, model.name, settings.stage)
        sets = dict(feature_sets)
        first = catalog.ablates_first(store, sets_from)
        sets = {p: s for p, s in sorted(sets.items()) if s}
        if settings.max_prompts is not None:
            sets = dict(list(sets.items())[:settings.max_prompts])
        if not sets:
            skipped["feature_ablation"] = (f"no stage-{settings.stage} feature sets for {model.name} in the store; "
                                           f"run `python cli.py analyze prune --model {model.name}`")
        else:
            out.append(_Condition("feature_ablation", [ablation(s, first) for s in sets.values()], list(sets)))
    return out, skipped


def _costs_id(model: str, settings: CostsSettings, conditions: Sequence[_Condition], judge_id: str) -> str:
    blob = json.dumps({"model": model, "settings": asdict(settings), "judge": judge_id,
                       "conditions": {c.name: [s.spec_hash() for s in c.specs] for c in conditions}},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- measuring ---------------------------------------------------------------------------------

def _measure(store: Store, model: LoadedModel, saes: Sequence[SaeRef], settings: CostsSettings,
             cond: _Condition, samples: _Samples, judge: Judge, log: Log) -> list[dict[str, Any]]:
    """One row per spec of the condition: CE on both corpora and over-refusal, with the run ids."""
    refs = [s for s in saes if s.layer in {l for spec in cond.specs for l in spec.layers}]
    by_spec: dict[str, dict[str, Any]] = {s.spec_hash(): {"set_prompt_id": p, "n_features": _n_features(s)}
                                          for s, p in zip(cond.specs, cond.set_ids)}
    for corpus, prompts, raw in (("alpaca", samples.alpaca, False), ("text", samples.text, True)):
        if not prompts:
            continue
        log(f"  {corpus}: {len(prompts) * len(cond.specs)} items")
        run_id, per_spec = loss_run(store, model, refs, cond.specs, prompts, raw)
        for spec_hash, ce, n, n_tok in per_spec.iter_rows():
            by_spec[spec_hash].update({f"ce_{corpus}": ce, f"n_{corpus}": n, f"n_{corpus}_tokens": n_tok,
                                       f"{corpus}_run_id": run_id})
    if samples.xstest:
        specs = [cond.specs[j % len(cond.specs)] for j in range(len(samples.xstest))]
        items = make_items(model, samples.xstest, specs)
        log(f"  xstest: {len(items)} items, {settings.generate}-token completions")
        gen = ExtractSettings(positions="last:1", generate=settings.generate, batch_size=settings.batch_size,
                              sae_rows=False)
        run_id = extract(store, model, items, refs, gen).run_id
        verdicts = judge_run(store, run_id, judge)
        spec_of = store.sql("SELECT item, spec_hash FROM items WHERE run_id = ?", [run_id])
        per = (verdicts.join(spec_of, on="item").group_by("spec_hash")
               .agg((pl.col("verdict") == "refusal").sum().alias("n_refused"), pl.len().alias("n")))
        for spec_hash, n_refused, n in per.iter_rows():
            by_spec[spec_hash].update({"over_refusal": n_refused / n, "n_xstest": n, "n_refused": n_refused,
                                       "xstest_run_id": run_id})
    return [{"condition": cond.name, **row} for row in by_spec.values()]


def loss_run(store: Store, model: LoadedModel, saes: Sequence[SaeRef], specs: Sequence[Intervention],
             prompts: Sequence[Prompt], raw: bool = False) -> tuple[str, pl.DataFrame]:
    """One loss run of every (spec, prompt) pair: its run id and, per spec_hash, ce (nats), n, n_tokens.

    Chat-formatted prompts score their instruction (user) tokens; `raw` texts score every token."""
    pairs = [(p, s) for s in specs for p in prompts]
    items = make_items(model, [p for p, _ in pairs], [s for _, s in pairs], raw=raw)
    loss = ExtractSettings(positions="last:1", loss=True, batch_size=LOSS_BATCH_SIZE, sae_rows=False)
    run_id = extract(store, model, items, saes, loss).run_id
    return run_id, _ce_by_spec(store, run_id)


def _ce_items(store: Store, run_id: str) -> pl.DataFrame:
    """spec_hash, prompt_id, ce_loss, n_loss_tokens of every scored item of one loss run."""
    return store.sql("SELECT spec_hash, prompt_id, ce_loss, n_loss_tokens FROM items WHERE run_id = ? "
                     "AND n_loss_tokens > 0 ORDER BY spec_hash, prompt_id", [run_id])


def _differences(store: Store, rows: list[dict[str, Any]], settings: CostsSettings) -> None:
    """Add to each condition's rows (as `_diff*` entries) the CE difference to the baseline on the same prompts,
    averaged over the condition's sets, with a paired bootstrap interval; nothing without a baseline."""
    base = next((r for r in rows if r["condition"] == "baseline"), None)
    if base is None:
        return
    for corpus in ("alpaca", "text"):
        if not base.get(f"{corpus}_run_id"):
            continue
        ref = _ce_items(store, base[f"{corpus}_run_id"])
        order = ref["prompt_id"].to_list()
        for name in CONDITIONS[1:]:
            mine = [r for r in rows if r["condition"] == name and r.get(f"{corpus}_run_id")]
            if not mine:
                continue
            items = _ce_items(store, mine[0][f"{corpus}_run_id"])
            specs = sorted(set(items["spec_hash"]))
            wide = {h: dict(zip(g["prompt_id"], zip(g["ce_loss"], g["n_loss_tokens"])))
                    for (h,), g in items.group_by(["spec_hash"])}
            if any(set(wide[h]) != set(order) for h in specs):
                continue                                  # not the same prompts: no paired difference
            values = np.array([[wide[h][p][0] for p in order] for h in specs])          # [n_specs, n_prompts]
            weights = np.array([[wide[h][p][1] for p in order] for h in specs], dtype=float)
            est = bootstrap_paired_mean_diff(values, weights, ref["ce_loss"].to_numpy(),
                                             ref["n_loss_tokens"].to_numpy().astype(float), seed=settings.seed)
            for r in mine:
                r[f"_diff_{corpus}"] = est


def _n_features(spec: Intervention) -> int:
    return sum(len(f) for f in spec.zero_ablate.values())


def _ce_by_spec(store: Store, run_id: str) -> pl.DataFrame:
    """spec_hash, token-weighted mean CE (nats), items, scored tokens of one loss run."""
    return store.sql(
        "SELECT spec_hash, sum(ce_loss * n_loss_tokens) / sum(n_loss_tokens) AS ce, count(*) AS n, "
        "sum(n_loss_tokens) AS n_tokens FROM items WHERE run_id = ? AND n_loss_tokens > 0 GROUP BY spec_hash",
        [run_id])


# ---- the table ---------------------------------------------------------------------------------

_COLUMNS = {"costs_id": pl.String, "model": pl.String, "condition": pl.String, "set_prompt_id": pl.String,
            "n_sets": pl.Int32, "n_features": pl.Float64,
            "ce_alpaca": pl.Float64, "ce_alpaca_std": pl.Float64, "n_alpaca": pl.Int32, "n_alpaca_tokens": pl.Int32,
            "ce_text": pl.Float64, "ce_text_std": pl.Float64, "n_text": pl.Int32, "n_text_tokens": pl.Int32,
            "over_refusal": pl.Float64, "over_refusal_std": pl.Float64, "n_xstest": pl.Int32, "judge": pl.String,
            "over_refusal_ci_low": pl.Float64, "over_refusal_ci_high": pl.Float64,
            "ce_alpaca_diff": pl.Float64, "ce_alpaca_diff_low": pl.Float64, "ce_alpaca_diff_high": pl.Float64,
            "ce_text_diff": pl.Float64, "ce_text_diff_low": pl.Float64, "ce_text_diff_high": pl.Float64,
            "alpaca_run_id": pl.String, "text_run_id": pl.String, "xstest_run_id": pl.String,
            "settings": pl.String, "created_at": pl.Datetime("us"), "code_version": pl.String}


def _frame(costs_id: str, model: str, settings: CostsSettings, judge_id: str,
           rows: list[dict[str, Any]]) -> pl.DataFrame:
    """The `costs` rows: per condition, plus per set for feature ablation (mean and std over sets)."""
    out = []
    for name in CONDITIONS:
        mine = [r for r in rows if r["condition"] == name]
        if not mine:
            continue
        if name == "feature_ablation":
            out += [{**r, "n_sets": 1} for r in mine]
        row = _summary(name, mine)
        for corpus in ("alpaca", "text"):                  # the condition's paired difference to the baseline
            est = mine[0].get(f"_diff_{corpus}")
            if name == "baseline":
                row.update({f"ce_{corpus}_diff": 0.0} if row.get(f"ce_{corpus}") is not None else {})
            elif est is not None:
                row.update({f"ce_{corpus}_diff": est.value, f"ce_{corpus}_diff_low": est.low,
                            f"ce_{corpus}_diff_high": est.high})
        out.append(row)
    for row in out:
        if row.get("n_xstest"):
            refused = row.get("n_refused", round(row["over_refusal"] * row["n_xstest"]))
            ci = rate_ci(int(refused), int(row["n_xstest"]))
            row.update(over_refusal_ci_low=ci["ci_low"], over_refusal_ci_high=ci["ci_high"])
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    common = {"costs_id": costs_id, "model": model, "judge": judge_id if settings.n_xstest else None,
              "settings": json.dumps(asdict(settings), sort_keys=True), "created_at": now,
              "code_version": code_version()}
    return pl.DataFrame([{c: {**r, **common}.get(c) for c in _COLUMNS} for r in out], schema=_COLUMNS)


def _summary(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition's row: the only row, or the mean over sets with the std (ddof 1) over sets."""
    if len(rows) == 1:
        return {**rows[0], "n_sets": 1 if name == "feature_ablation" else None, "set_prompt_id": None}
    row: dict[str, Any] = {"condition": name, "set_prompt_id": None, "n_sets": len(rows),
                           "n_features": float(np.mean([r["n_features"] for r in rows]))}
    for corpus in ("alpaca", "text"):
        values = [r[f"ce_{corpus}"] for r in rows if r.get(f"ce_{corpus}") is not None]
        if values:
            row[f"ce_{corpus}"] = float(np.mean(values))
            row[f"ce_{corpus}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            row[f"n_{corpus}"] = rows[0][f"n_{corpus}"]
            row[f"n_{corpus}_tokens"] = rows[0][f"n_{corpus}_tokens"]
            row[f"{corpus}_run_id"] = rows[0][f"{corpus}_run_id"]
    judged = [r for r in rows if r.get("n_xstest")]
    if judged:                                        # pooled over every prompt; std over the per-set rates
        rates = [r["over_refusal"] for r in judged]
        row["n_refused"] = sum(r["n_refused"] for r in judged)
        row["over_refusal"] = row["n_refused"] / sum(r["n_xstest"] for r in judged)
        row["over_refusal_std"] = float(np.std(rates, ddof=1)) if len(rates) > 1 else None
        row["n_xstest"] = sum(r["n_xstest"] for r in judged)
        row["xstest_run_id"] = judged[0]["xstest_run_id"]
    return row


def _save(store: Store, costs_id: str, frame: pl.DataFrame) -> None:
    with store.transaction() as con:
        con.execute("DELETE FROM costs WHERE costs_id = ?", [costs_id])
        con.register("incoming", frame.to_arrow())
        con.execute("INSERT INTO costs BY NAME SELECT * FROM incoming")
        con.unregister("incoming")


def costs_table(result: CostsResult) -> pl.DataFrame:
    """The printable table: condition, sets, CE Alpaca / text (mean ± std over sets), the difference to baseline
    with its paired bootstrap interval, over-refusal with its Wilson interval."""
    def pm(mean: str, std: str) -> pl.Expr:
        return (pl.col(mean).round(4).cast(pl.String)
                + pl.when(pl.col(std).is_not_null()).then(pl.lit(" ± ") + pl.col(std).round(4).cast(pl.String))
                .otherwise(pl.lit(""))).alias(mean)
    rows = result.table.to_dicts()
    return result.table.select("condition", "n_sets", pm("ce_alpaca", "ce_alpaca_std"), pm("ce_text", "ce_text_std")).with_columns(
        pl.Series("Δ alpaca", [_diff_text(r, "alpaca") for r in rows], pl.String),
        pl.Series("Δ text", [_diff_text(r, "text") for r in rows], pl.String),
        pl.Series("over_refusal", [_refusal_text(r) for r in rows], pl.String))


def _diff_text(row: dict[str, Any], corpus: str) -> str:
    """'+0.123 [+0.081, +0.170]': the CE difference to baseline and its paired 95% interval; '-' unmeasured."""
    diff, low, high = (row.get(f"ce_{corpus}_diff{s}") for s in ("", "_low", "_high"))
    if diff is None:
        return "-"
    return f"{diff:+.3f}" + (f" [{low:+.3f}, {high:+.3f}]" if low is not None else "")


def _refusal_text(row: dict[str, Any]) -> str:
    n = row.get("n_xstest")
    return rate_text(round(row["over_refusal"] * n), n) if n and row.get("over_refusal") is not None else "-"


def summary_line(r: CostsResult) -> str:
    """One line: CE on Alpaca / WikiText-2 (difference to baseline, paired 95% interval) and over-refusal per condition."""
    parts = [f"{row['condition']} {fmt(row['ce_alpaca'], '.3f')}/{fmt(row['ce_text'], '.3f')}"
             + (f" (Δ {_diff_text(row, 'alpaca')}/{_diff_text(row, 'text')})" if row["condition"] != "baseline" else "")
             + f"/{_refusal_text(row)}" for row in r.table.iter_rows(named=True)]
    skipped = "".join(f"; {c} skipped" for c in r.skipped)
    return f"CE Alpaca/WikiText-2 (nats) and over-refusal: {', '.join(parts)}{skipped}"


def detail_lines(r: CostsResult) -> list[str]:
    """The costs table and why any condition was skipped."""
    return [frame_text(costs_table(r))] + [f"skipped {c}: {why}" for c, why in r.skipped.items()]
