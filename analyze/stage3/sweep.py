"""Stage 3's sweep: ablate the stage-2 set plus the top-K ranked latents, judge, ASR per K and stage-3 sets.

The stage-2 part is the set's active features by default (the paper's quantity: "jailbroken by ablating
active features", its dormant, redundant features removed first) or the whole set (`stage2_set = "full"`).
Then each prompt's stage-3 set alone (ranker `stage3_alone`, k = 0: the paper's 330 of 372), and FM
against probe on the same prompts at every K both ran (McNemar, Newcombe's paired interval).
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from analyze import catalog
from analyze.catalog import save_analysis
from analyze.common import Feature, Log, ablation, analysis_id, model_key, evaluate
from analyze.judges import Judge, get_judge, judge_run
from analyze.metrics import Paired, rate_ci
from analyze.stage3.data import FmData
from analyze.stage3.fm import FmFit
from analyze.stage3.probe import ProbeFit
from analyze.stage3.rank import _Plan, _plans, top_k
from extract.datasets import Prompt
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef
from store import Store, UsageError

if TYPE_CHECKING:
    from analyze.stage3.stage import Stage3Result, Stage3Settings


def _sweep(store: Store, model: LoadedModel, saes: Sequence[SaeRef], settings: Stage3Settings, data: FmData,
           swept: Sequence[Prompt], stage2: Mapping[str, Sequence[Feature]], fm_fit: tuple[FmFit, str],
           probe_fit: tuple[ProbeFit, str], result: Stage3Result, log: Log,
           active: Mapping[str, Sequence[Feature]] | None = None) -> Stage3Result:
    judge = get_judge(settings.judge)
    swept = list(swept)[:settings.max_prompts or None]
    plans = _plans(data, swept, stage2, fm_fit[0].model.V, probe_fit[0].coef, settings, active)
    if not plans:
        raise UsageError("none of the stage-2 prompts has a stage-2 latent among the FM's columns; "
                         "check that the FM layers cover the stage-2 layers")
    sweep_id = analysis_id("stage3", model_key(model), result.prune_id, settings,
                           {"fm": fm_fit[1], "probe": probe_fit[1], "judge": judge.judge_id,
                            "stage2": {p.prompt.prompt_id: p.stage2 for p in plans}})
    es = ExtractSettings(positions=f"last:{settings.n_last}", batch_size=settings.batch_size,
                         generate=settings.generate if judge.needs_completion else 0)
    first = catalog.ablates_first(store, result.prune_id)       # position 0 as the stage-2 sets were found
    steps = [("stage2", 0)] + [("fm", k) for k in settings.ks] + [("probe", k) for k in settings.probe_k_values]
    outcomes = []
    for ranker, k in steps:
        log(f"ablating stage-2 set ({settings.stage2_set}) + {ranker} top-{k} on {len(plans)} prompts")
        sets = [list(p.base) + (top_k(p, ranker, k, data) if k else []) for p in plans]
        outcomes.append(_judged(store, model, saes, es, judge, ranker, k, [p.prompt for p in plans], sets, first))
    table = pl.concat(outcomes)
    stage3 = _stage3_sets(sweep_id, table, plans, data)
    alone = _alone_sets(stage3, plans)
    if alone:
        log(f"ablating the stage-3 sets alone on {len(alone)} prompts")
        table = pl.concat([table, _judged(store, model, saes, es, judge, "stage3_alone", 0,
                                          [p.prompt for p, _ in alone], [s for _, s in alone], first)])
    asr = _asr(table)
    paired = fm_vs_probe(table)
    result = replace(result, sweep_id=sweep_id, judge=judge.judge_id, asr=asr, n_swept=len(plans),
                     n_skipped=len(swept) - len(plans), n_stage3_sets=stage3["prompt_id"].n_unique())
    metrics = {"fm_model_id": result.fm_model_id, "probe_model_id": result.probe_model_id,
               "layers": list(result.layers), "fm_accuracy": result.fm_accuracy,
               "probe_accuracy": result.probe_accuracy, "probe_C": result.probe_C,
               "similarity": result.similarity.to_dicts(), "asr": asr.to_dicts(), "n_swept": result.n_swept,
               "n_skipped": result.n_skipped, "n_stage3_sets": result.n_stage3_sets, "stage2_set": settings.stage2_set,
               "n_stage2_features": sum(len(p.stage2) for p in plans),
               "n_stage2_ablated": sum(len(p.base) for p in plans),
               "paired": [{"k": k, **t.as_dict()} for _, _, k, t in paired]}
    with_id = pl.lit(sweep_id).alias("sweep_id")
    save_analysis(store, sweep_id, "stage3", model.name, result.prune_id, judge.judge_id, settings, metrics, {
        "stage3_rankings": ("sweep_id", _rankings_frame(plans, data).with_columns(with_id)),
        "stage3_outcomes": ("sweep_id", table.with_columns(with_id)),
        "stage3_asr": ("sweep_id", asr.with_columns(with_id)),
        "feature_sets": ("set_id", stage3),
        "paired_tests": ("analysis_id", catalog.paired_tests_frame(sweep_id, paired))})
    return replace(result, paired=tuple((k, t) for _, _, k, t in paired))


def _judged(store: Store, model: LoadedModel, saes: Sequence[SaeRef], es: ExtractSettings, judge: Judge,
            ranker: str, k: int, prompts: Sequence[Prompt], sets: Sequence[Sequence[Feature]],
            first: bool = True) -> pl.DataFrame:
    """One extraction run ablating each set on its prompt (at position 0 too when `first`), judged:
    `stage3_outcomes` rows (no sweep id yet)."""
    done = evaluate(store, model, list(prompts), [ablation(s, first) for s in sets], saes, es)
    verdicts = judge_run(store, done.run_id, judge)["verdict"].to_numpy()[done.items]
    return pl.DataFrame({
        "ranker": ranker, "k": k, "prompt_id": [p.prompt_id for p in prompts],
        "n_ablated": [len(set(s)) for s in sets], "run_id": done.run_id, "item": done.items, "p_i": done.p_i,
        "verdict": verdicts, "jailbroken": verdicts == "compliance",
    }, schema_overrides={"k": pl.Int32, "n_ablated": pl.Int32, "item": pl.Int32, "p_i": pl.Float32})


def _alone_sets(stage3: pl.DataFrame, plans: Sequence[_Plan]) -> list[tuple[_Plan, list[Feature]]]:
    """(plan, its stage-3 set) for every prompt that has one, in plan order."""
    by_prompt: dict[str, list[Feature]] = {}
    if stage3.is_empty():
        return []
    for prompt_id, layer, feature in stage3.select("prompt_id", "layer", "feature").iter_rows():
        by_prompt.setdefault(prompt_id, []).append((int(layer), int(feature)))
    return [(p, by_prompt[p.prompt.prompt_id]) for p in plans if p.prompt.prompt_id in by_prompt]


def fm_vs_probe(outcomes: pl.DataFrame) -> list[tuple[str, str, int, Paired]]:
    """At every K both rankers ran: FM against probe on the same prompts (a, b, k, table)."""
    fm = outcomes.filter(pl.col("ranker") == "fm").select("k", "prompt_id", pl.col("jailbroken").alias("fm"))
    probe = outcomes.filter(pl.col("ranker") == "probe").select("k", "prompt_id", pl.col("jailbroken").alias("probe"))
    both = fm.join(probe, on=["k", "prompt_id"]).sort("k", "prompt_id")
    return [("fm", "probe", int(k), Paired.of(rows["fm"], rows["probe"]))
            for (k,), rows in both.group_by(["k"], maintain_order=True)]


def _asr(outcomes: pl.DataFrame) -> pl.DataFrame:
    """Per (ranker, K): prompts, jailbroken, ASR and its Wilson 95% interval, the run."""
    asr = (outcomes.group_by("ranker", "k", maintain_order=True)
           .agg(pl.len().cast(pl.Int32).alias("n_prompts"),
                pl.col("jailbroken").sum().cast(pl.Int32).alias("n_jailbroken"),
                pl.col("jailbroken").mean().alias("asr"), pl.col("run_id").first()))
    cis = [rate_ci(k, n) for k, n in asr.select("n_jailbroken", "n_prompts").iter_rows()]
    return asr.with_columns(pl.Series("ci_low", [c["ci_low"] for c in cis], pl.Float64),
                            pl.Series("ci_high", [c["ci_high"] for c in cis], pl.Float64))


def _stage3_sets(sweep_id: str, outcomes: pl.DataFrame, plans: Sequence[_Plan], data: FmData) -> pl.DataFrame:
    """`feature_sets` rows: per prompt jailbroken by some FM K, its FM top-K at the smallest such K."""
    first = (outcomes.filter((pl.col("ranker") == "fm") & pl.col("jailbroken"))
             .group_by("prompt_id").agg(pl.col("k").min()))
    by_prompt = {p.prompt.prompt_id: p for p in plans}
    parts = [pl.DataFrame({"prompt_id": []}, schema={"prompt_id": pl.String})]
    for prompt_id, k in first.sort("prompt_id").iter_rows():
        cols, scores = by_prompt[prompt_id].ranked["fm"]
        parts.append(pl.DataFrame({"prompt_id": prompt_id, "layer": data.layer[cols[:k]].astype(np.int16),
                                   "feature": data.feature[cols[:k]].astype(np.int32),
                                   "score": scores[:k].astype(np.float32)}))
    return pl.concat(parts, how="diagonal").with_columns(
        pl.lit(sweep_id).alias("set_id"), pl.lit(3, pl.Int8).alias("stage"), pl.lit(None, pl.Float32).alias("tau"),
        pl.lit(True).alias("selected"))


def _rankings_frame(plans: Sequence[_Plan], data: FmData) -> pl.DataFrame:
    parts = []
    for plan in plans:
        for ranker, (cols, scores) in plan.ranked.items():
            parts.append(pl.DataFrame({
                "ranker": ranker, "prompt_id": plan.prompt.prompt_id,
                "rank": np.arange(1, len(cols) + 1, dtype=np.int32), "layer": data.layer[cols].astype(np.int16),
                "feature": data.feature[cols].astype(np.int32), "score": scores.astype(np.float32)}))
    return pl.concat(parts)


