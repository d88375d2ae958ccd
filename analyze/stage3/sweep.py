"""Stage 3's sweep: ablate the stage-2 set plus the top-K ranked latents, judge, ASR per K and stage-3 sets."""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from analyze.catalog import save_analysis
from analyze.common import Feature, Log, ablation, analysis_id, evaluate
from analyze.judges import get_judge, judge_run
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
           probe_fit: tuple[ProbeFit, str], result: Stage3Result, log: Log) -> Stage3Result:
    judge = get_judge(settings.judge)
    swept = list(swept)[:settings.max_prompts or None]
    plans = _plans(data, swept, stage2, fm_fit[0].model.V, probe_fit[0].coef, settings)
    if not plans:
        raise UsageError("none of the stage-2 prompts has a stage-2 latent among the FM's columns; "
                         "check that the FM layers cover the stage-2 layers")
    sweep_id = analysis_id("stage3", model.name, result.prune_id, settings,
                           {"fm": fm_fit[1], "probe": probe_fit[1], "judge": judge.judge_id,
                            "stage2": {p.prompt.prompt_id: p.stage2 for p in plans}})
    es = ExtractSettings(positions=f"last:{settings.n_last}", batch_size=settings.batch_size,
                         generate=settings.generate if judge.needs_completion else 0)
    steps = [("stage2", 0)] + [("fm", k) for k in settings.ks] + [("probe", k) for k in settings.probe_ks]
    outcomes = []
    for ranker, k in steps:
        log(f"ablating stage-2 set + {ranker} top-{k} on {len(plans)} prompts")
        sets = [list(p.stage2) + (top_k(p, ranker, k, data) if k else []) for p in plans]
        done = evaluate(store, model, [p.prompt for p in plans], [ablation(s) for s in sets], saes, es)
        verdicts = judge_run(store, done.run_id, judge)["verdict"].to_numpy()[done.items]
        outcomes.append(pl.DataFrame({
            "ranker": ranker, "k": k, "prompt_id": [p.prompt.prompt_id for p in plans],
            "n_ablated": [len(set(s)) for s in sets], "run_id": done.run_id, "item": done.items, "p_i": done.p_i,
            "verdict": verdicts, "jailbroken": verdicts == "compliance",
        }, schema_overrides={"k": pl.Int32, "n_ablated": pl.Int32, "item": pl.Int32, "p_i": pl.Float32}))
    table = pl.concat(outcomes)
    asr = _asr(table)
    stage3 = _stage3_sets(sweep_id, table, plans, data)
    result = replace(result, sweep_id=sweep_id, judge=judge.judge_id, asr=asr, n_swept=len(plans),
                     n_skipped=len(swept) - len(plans), n_stage3_sets=stage3["prompt_id"].n_unique())
    metrics = {"fm_model_id": result.fm_model_id, "probe_model_id": result.probe_model_id,
               "layers": list(result.layers), "fm_accuracy": result.fm_accuracy,
               "probe_accuracy": result.probe_accuracy, "probe_C": result.probe_C,
               "similarity": result.similarity.to_dicts(), "asr": asr.to_dicts(), "n_swept": result.n_swept,
               "n_skipped": result.n_skipped, "n_stage3_sets": result.n_stage3_sets}
    with_id = pl.lit(sweep_id).alias("sweep_id")
    save_analysis(store, sweep_id, "stage3", model.name, result.prune_id, judge.judge_id, settings, metrics, {
        "stage3_rankings": ("sweep_id", _rankings_frame(plans, data).with_columns(with_id)),
        "stage3_outcomes": ("sweep_id", table.with_columns(with_id)),
        "stage3_asr": ("sweep_id", asr.with_columns(with_id)),
        "feature_sets": ("set_id", stage3)})
    return result


def _asr(outcomes: pl.DataFrame) -> pl.DataFrame:
    return (outcomes.group_by("ranker", "k", maintain_order=True)
            .agg(pl.len().cast(pl.Int32).alias("n_prompts"),
                 pl.col("jailbroken").sum().cast(pl.Int32).alias("n_jailbroken"),
                 pl.col("jailbroken").mean().alias("asr"), pl.col("run_id").first()))


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


