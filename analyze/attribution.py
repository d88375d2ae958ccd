"""Beyond the paper: gradient attribution over SAE latents, and how faithful it is to real ablations.

For each stage-1 prompt (the prompts the candidates analysis found refused) and each SAE layer it
used, every latent active on the prompt gets the linear prediction of zero-ablating it at every
position with the SAE error kept (extract/gradients.py: one forward and backward per batch for
attribution patching, `steps` passes per layer for integrated gradients). The gradient pass is an
extraction-layer computation; its scores are stored in `attribution_scores` and every later use
(ranking stage 1, ordering stage 2) reads them from there.

Faithfulness: per prompt and layer, `n_single` single latents (half the most attributed by |score|,
half drawn at random from the other active ones) and `n_blocks` blocks of `block_size` random
active latents are ablated in one real extraction run (`evaluate`). The predicted delta of a set is
the sum of its latents' scores (first order in every latent); the measured one comes from the run's
P("I") (log_p) or its stored last-position logits (logit_diff, float16). Pearson and Spearman of
predicted against measured delta P("I") (log_p: predicted dP = P0 (exp(predicted) - 1)) and of the
metric itself are stored per layer, per kind and over all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from analyze import catalog
from analyze.catalog import latest_analysis, save_analysis
from analyze.common import Log, ablation, analysis_id, evaluate, load_saes, no_log, stored_prompts
from analyze.text import fmt, span
from extract.datasets import Prompt
from extract.gradients import METRICS, GradientSettings, attributions
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef
from store import Store, UsageError
from store.settings import Settings


@dataclass(frozen=True)
class AttributionSettings(Settings):
    candidates_id: str | None = None     # None: the newest candidates analysis; its refused prompts and SAE layers
    metric: str = "log_p"                # log_p (log P("I")) | logit_diff (extract/gradients.py)
    steps: int = 1                       # integrated-gradient points; 1 = attribution patching
    batch_size: int = 8                  # prompts per gradient pass, rows per forward in the check run
    max_prompts: int | None = None       # at most this many prompts, the first by prompt id (None: all)
    n_single: int = 4                    # faithfulness: single latents per prompt and layer
    n_blocks: int = 2                    # faithfulness: blocks per prompt and layer
    block_size: int = 5                  # latents per faithfulness block (Algorithm 1's N)
    check_seed: int = 0

    def __post_init__(self) -> None:
        GradientSettings(self.metric, self.steps, self.batch_size)          # checks metric, steps, batch size
        for name in ("n_single", "n_blocks"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size < 1:
            raise UsageError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UsageError(f"max_prompts must be >= 1 (or null: all), got {self.max_prompts}")

    @property
    def method(self) -> str:
        return "atp" if self.steps == 1 else "ig"


@dataclass(frozen=True)
class AttributionResult:
    attribution_id: str
    candidates_id: str
    scores: pl.DataFrame = field(repr=False)          # attribution_scores rows
    checks: pl.DataFrame = field(repr=False)          # attribution_checks rows
    correlations: pl.DataFrame = field(repr=False)    # attribution_correlations rows
    metrics: dict[str, Any] = field(default_factory=dict)


def run(store: Store, model: LoadedModel, settings: AttributionSettings, log: Log = no_log) -> AttributionResult:
    """Attribution of every active latent on the stage-1 prompts, checked against real ablations; saved."""
    cand = latest_analysis(store, "candidates", model.name, settings.candidates_id)
    prompts = _refused_prompts(store, cand["analysis_id"], settings.max_prompts)
    excluded = set(cand["settings"].get("exclude_layers", ()))
    saes = [s for s in load_saes(store, model, cand["settings"].get("saes", ())) if s.layer not in excluded]
    aid = analysis_id("attribution", model.name, cand["analysis_id"], settings,
                      {"saes": {str(s.layer): s.source for s in saes}, "prompts": [p.prompt_id for p in prompts],
                       "dtype": str(model.dtype)})
    log(f"gradient pass ({settings.method}, {settings.steps} steps, {settings.metric}) over {len(prompts)} prompts, "
        f"SAE layers {span([s.layer for s in saes])}")
    found = attributions(model, prompts, saes, GradientSettings(settings.metric, settings.steps, settings.batch_size),
                         lambda n: log(f"  {n}/{len(prompts)} prompts"))
    scores = found.scores.with_columns(pl.lit(aid).alias("attribution_id"), pl.lit(settings.metric).alias("metric"),
                                       pl.lit(settings.method).alias("method"),
                                       pl.lit(settings.steps, pl.Int32).alias("steps"))
    samples = _samples(found.scores, prompts, settings)
    log(f"faithfulness: {len(samples)} real ablations")
    checks = _measure(store, model, prompts, samples, saes, found.prompts, settings, log)
    checks = checks.with_columns(pl.lit(aid).alias("attribution_id"))
    correlations = _correlations(checks).with_columns(pl.lit(aid).alias("attribution_id"))
    overall = correlations.filter(pl.col("layer").is_null() & (pl.col("kind") == "all"))
    metrics = {"n_prompts": len(prompts), "n_scores": scores.height, "sae_layers": [s.layer for s in saes],
               "metric": settings.metric, "method": settings.method, "steps": settings.steps,
               "n_checks": checks.height, "check_run": checks["run_id"][0] if checks.height else None,
               "overall": overall.select("quantity", "n", "pearson", "spearman").to_dicts()}
    save_analysis(store, aid, "attribution", model.name, cand["analysis_id"], "none", settings, metrics, {
        "attribution_scores": ("attribution_id", scores),
        "attribution_prompts": ("attribution_id", found.prompts.with_columns(pl.lit(aid).alias("attribution_id"))),
        "attribution_checks": ("attribution_id", checks),
        "attribution_correlations": ("attribution_id", correlations)})
    return AttributionResult(aid, cand["analysis_id"], scores, checks, correlations, metrics)


def _refused_prompts(store: Store, candidates_id: str, max_prompts: int | None) -> list[Prompt]:
    """The prompts stage 1 swept: refused without intervention (its clean row, K = 0)."""
    df = store.sql("SELECT prompt_id FROM candidate_sets WHERE candidates_id = ? AND k = 0 AND verdict = 'refusal' "
                   "ORDER BY prompt_id", [candidates_id]).head(max_prompts or 10**9)
    if df.is_empty():
        raise UsageError(f"candidates analysis {candidates_id} has no refused prompt to attribute")
    return stored_prompts(store, df["prompt_id"].to_list())


def _samples(scores: pl.DataFrame, prompts: list[Prompt], settings: AttributionSettings) -> list[dict[str, Any]]:
    """Faithfulness checks: per prompt and layer, single latents (top |score| and random) and random blocks."""
    out = []
    for i, prompt in enumerate(prompts):
        mine = scores.filter(pl.col("prompt_id") == prompt.prompt_id)
        for layer in sorted(set(mine["layer"].to_list())):
            rows = mine.filter(pl.col("layer") == layer).sort(pl.col("score").abs(), "feature", descending=[True, False])
            features, score = rows["feature"].to_list(), dict(zip(rows["feature"], rows["score"]))
            rng = np.random.default_rng([settings.check_seed, i, layer])
            n_top = (settings.n_single + 1) // 2
            rest = features[n_top:]
            chosen = features[:n_top] + [rest[j] for j in rng.permutation(len(rest))[:settings.n_single - n_top]]
            out += [{"prompt": i, "kind": "single", "layer": layer, "features": [f], "predicted": score[f]}
                    for f in chosen[:settings.n_single]]
            if len(features) >= settings.block_size:
                for _ in range(settings.n_blocks):
                    block = sorted(features[j] for j in rng.choice(len(features), settings.block_size, replace=False))
                    out.append({"prompt": i, "kind": "block", "layer": layer, "features": block,
                                "predicted": float(sum(score[f] for f in block))})
    return out


def _measure(store: Store, model: LoadedModel, prompts: list[Prompt], samples: list[dict[str, Any]],
             saes: list[SaeRef], clean: pl.DataFrame, settings: AttributionSettings, log: Log) -> pl.DataFrame:
    """One ablation run: the clean prompts and every sample; predicted against measured deltas."""
    logits = settings.metric == "logit_diff"
    run_settings = ExtractSettings(positions="last:1", generate=0, batch_size=settings.batch_size, sae_rows=False,
                                   save_logits=logits)
    specs = [Intervention()] * len(prompts) + [ablation([(s["layer"], f) for f in s["features"]]) for s in samples]
    rows = list(range(len(prompts))) + [s["prompt"] for s in samples]
    done = evaluate(store, model, [prompts[i] for i in rows], specs, saes, run_settings, log=log)
    if logits:
        compliant = dict(zip(clean["prompt_id"], clean["compliant_token"]))
        metric = _logit_diffs(store, model, done.run_id, done.items,
                              [compliant[prompts[i].prompt_id] for i in rows])
    else:
        metric = np.log(done.p_i)
    n = len(prompts)
    p0, m0 = done.p_i[:n], metric[:n]
    frame = pl.DataFrame({
        "prompt_id": [prompts[s["prompt"]].prompt_id for s in samples], "kind": [s["kind"] for s in samples],
        "layer": [s["layer"] for s in samples], "features": [s["features"] for s in samples],
        "predicted_delta": [s["predicted"] for s in samples],
        "measured_delta": [float(metric[n + k] - m0[s["prompt"]]) for k, s in enumerate(samples)],
        "predicted_dp": [float(p0[s["prompt"]] * np.expm1(s["predicted"])) if not logits else None for s in samples],
        "measured_dp": [float(done.p_i[n + k] - p0[s["prompt"]]) for k, s in enumerate(samples)],
        "run_id": done.run_id, "item": done.items[n:].astype(np.int32)},
        schema={"prompt_id": pl.String, "kind": pl.String, "layer": pl.Int16, "features": pl.List(pl.Int32),
                "predicted_delta": pl.Float64, "measured_delta": pl.Float64, "predicted_dp": pl.Float64,
                "measured_dp": pl.Float64, "run_id": pl.String, "item": pl.Int32})
    return frame


def _logit_diffs(store: Store, model: LoadedModel, run_id: str, items: np.ndarray, compliant: list[int]) -> np.ndarray:
    """logsumexp of the "I" logits minus the compliant token's logit, from the run's stored (float16) logits."""
    logits = store.read_rows(run_id, "logits_last", np.asarray(items)).astype(np.float64)   # [n, vocab]
    i_ids = list(model.i_token_ids)
    top = logits[:, i_ids].max(-1)
    lse = top + np.log(np.exp(logits[:, i_ids] - top[:, None]).sum(-1))
    return lse - logits[np.arange(len(compliant)), compliant]


def _correlations(checks: pl.DataFrame) -> pl.DataFrame:
    """Pearson and Spearman of predicted vs measured, per layer (and all layers) and kind (and all kinds)."""
    rows = []
    layers = [None] + sorted(set(checks["layer"].to_list()))
    for layer in layers:
        for kind in ("single", "block", "all"):
            part = checks.filter((pl.col("layer") == layer) if layer is not None else pl.lit(True))
            part = part.filter(pl.col("kind") == kind) if kind != "all" else part
            for quantity, pred, meas in (("dp", "predicted_dp", "measured_dp"),
                                         ("metric", "predicted_delta", "measured_delta")):
                both = part.select(pred, meas).drop_nulls()
                pearson, spearman = correlation(both[pred].to_numpy(), both[meas].to_numpy())
                if both.height:
                    rows.append({"layer": layer, "kind": kind, "quantity": quantity, "n": both.height,
                                 "pearson": pearson, "spearman": spearman})
    return pl.DataFrame(rows, schema={"layer": pl.Int16, "kind": pl.String, "quantity": pl.String, "n": pl.Int32,
                                      "pearson": pl.Float64, "spearman": pl.Float64})


def correlation(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """(Pearson, Spearman) of two samples; None where n < 3 or a side is constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    return float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def importance(store: Store, model: str, attribution_id: str | None,
               prompt_ids: list[str]) -> tuple[str, dict[str, dict[tuple[int, int], float]]]:
    """The attribution analysis used and prompt_id -> {(layer, feature): score} for these prompts (all present)."""
    row = latest_analysis(store, "attribution", model, attribution_id)
    scores = catalog.attribution_scores(store, row["analysis_id"])
    missing = [p for p in prompt_ids if p not in scores]
    if missing:
        raise UsageError(f"attribution analysis {row['analysis_id']} has no scores for {len(missing)} of the "
                         f"{len(prompt_ids)} prompts (e.g. {missing[0]}); run `python cli.py analyze attribution` "
                         f"on the candidates analysis that holds them")
    return row["analysis_id"], {p: scores[p] for p in prompt_ids}


def summary_line(r: AttributionResult) -> str:
    """One line: what was scored, and how well the prediction tracks the real ablations."""
    m = r.metrics
    dp = next((o for o in m["overall"] if o["quantity"] == ("dp" if m["metric"] == "log_p" else "metric")), None)
    what = 'dP("I")' if m["metric"] == "log_p" else "delta logit diff"
    check = (f"predicted vs measured {what} over {dp['n']} real ablations: Pearson {fmt(dp['pearson'])}, "
             f"Spearman {fmt(dp['spearman'])}") if dp else "no faithfulness checks"
    return (f"attribution {r.attribution_id} ({m['method']}, {m['steps']} steps, {m['metric']}): {m['n_scores']} active "
            f"latents on {m['n_prompts']} prompts, SAE layers {span(m['sae_layers'])}; {check}")


def detail_lines(r: AttributionResult) -> list[str]:
    """Per layer: Pearson and Spearman of singles, blocks and both."""
    quantity = "dp" if r.metrics["metric"] == "log_p" else "metric"
    table = r.correlations.filter(pl.col("quantity") == quantity)
    lines = [f"{'layer':>5} {'kind':>6} {'n':>4} {'pearson':>8} {'spearman':>8}"]
    for row in table.sort("layer", "kind", nulls_last=True).iter_rows(named=True):
        layer = "all" if row["layer"] is None else str(row["layer"])
        lines.append(f"{layer:>5} {row['kind']:>6} {row['n']:>4} {fmt(row['pearson']):>8} {fmt(row['spearman']):>8}")
    return lines
