"""Where the main job's time goes, stage by stage, and what the paper's parameters would cost.

Reads a store that `cli.py run` filled (the stages in `pipeline_stages`, the extraction runs each one
made in its time window) and prints, per stage: extraction runs, forward rows (items), prompt tokens,
generated tokens, seconds, seconds per 1,000 tokens, and the share of the stage spent inside runs.

Then a cost model: per stage, the forward rows as a function of the settings (prompts, the K grid,
pool sizes, taus, seeds ...), with the stage outcomes it needs (prompts refused, stage-1 K, stage-2
pools) measured in the same store. The measured rows calibrate each formula (factor c = measured /
formula at the measured profile); the prediction for another profile is c x formula there, with each
stage's measured seconds per row scaled by its generated-token share. No model runs here.

    python bench/bench_pipeline.py --store stores/quick --predict default
    python bench/bench_pipeline.py --store stores/quick --predict default --stage2-prompts 30

`--stage2-prompts N` predicts the target profile with as many stage-1 prompts as it takes to bring N
refused, jailbroken prompts to stage 2 at the measured refusal and stage-1 rates (and no max_prompts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyze import taxonomy  # noqa: E402
from analyze.pipeline import PipelineSettings, read_profile  # noqa: E402
from store import Store  # noqa: E402

N_LAYERS = 24                             # the default model's depth (profiles give layers as fractions)


@dataclass(frozen=True)
class Work:
    runs: int
    rows: int
    prompt_tokens: int
    generated_tokens: int
    decode_steps: int                     # batches x generation length: a CPU decode step costs ~ the same at any batch
    seconds: float
    run_seconds: float
    per_run: np.ndarray                   # [runs, 4]: seconds, 1, prompt tokens, decode steps


def stage_work(store: Store, model: str, profile: str) -> dict[str, Work]:
    """Measured work of each recorded stage: the runs created inside its wall-time window."""
    stages = store.sql("SELECT stage, seconds, finished_at FROM pipeline_stages WHERE model = ? AND profile = ? "
                       "ORDER BY finished_at", [model, profile])
    out: dict[str, Work] = {}
    for stage, seconds, finished in stages.iter_rows():
        runs = store.sql(
            "SELECT r.run_id, r.n_items, CAST(json_extract(r.settings, '$.generate') AS INT) AS generate, "
            "CAST(json_extract(r.settings, '$.batch_size') AS INT) AS batch_size, "
            "epoch(r.completed_at) - epoch(r.created_at) AS secs, "
            "(SELECT sum(n_tokens) FROM items i WHERE i.run_id = r.run_id) AS tokens FROM runs r "
            "WHERE r.status = 'complete' AND r.created_at <= ? AND r.created_at >= ? - to_microseconds(?)",
            [finished, finished, int(seconds * 1e6)])
        generated = sum(_generated(store, run_id) for run_id, gen in runs.select("run_id", "generate").iter_rows()
                        if gen)
        steps = [math.ceil(n / b) * g for n, b, g in runs.select("n_items", "batch_size", "generate").iter_rows()]
        per_run = np.array([[secs, 1.0, float(tok or 0), st] for secs, tok, st in
                            zip(runs["secs"].to_list(), runs["tokens"].to_list(), steps)]).reshape(-1, 4)
        out[stage] = Work(runs.height, int(runs["n_items"].sum() or 0), int(runs["tokens"].sum() or 0), generated,
                          int(sum(steps)), float(seconds), float(runs["secs"].sum() or 0.0), per_run)
    return out


def _generated(store: Store, run_id: str) -> int:
    ids = store.open_array(run_id, "completion_ids")[:]
    return int((ids >= 0).sum())


def outcomes(store: Store, model: str) -> dict[str, float]:
    """What the formulas need from the measured run: refusals, stage-1 K and rounds, stage-2 pools."""
    cand = store.sql("SELECT analysis_id FROM analyses WHERE kind = 'candidates' AND model = ? "
                     "ORDER BY created_at DESC LIMIT 1", [model])
    out: dict[str, float] = {}
    if cand.height:
        cid = cand["analysis_id"][0]
        sets = store.sql("SELECT prompt_id, k, jailbroken, chosen FROM candidate_sets WHERE candidates_id = ?", [cid])
        out["stage1_prompts"] = sets["prompt_id"].n_unique()
        out["stage1_refused"] = sets.filter(sets["k"] > 0)["prompt_id"].n_unique()   # the prompts swept past K = 0
        chosen = sets.filter(sets["chosen"])
        out["stage1_broken"] = chosen.height
        out["mean_k"] = float(chosen["k"].mean()) if chosen.height else 0.0
    prune = store.sql("SELECT analysis_id FROM analyses WHERE kind = 'prune' AND model = ? "
                      "ORDER BY created_at DESC LIMIT 1", [model])
    if prune.height:
        pid = prune["analysis_id"][0]
        steps = store.sql("SELECT prompt_id, max(step) + 1 AS steps, count(*) AS evals FROM pruning_steps "
                          "WHERE prune_id = ? GROUP BY prompt_id", [pid])
        out["stage2_prompts"] = steps.height
        out["mean_blocks"] = float(steps["steps"].mean()) if steps.height else 0.0
    return out


Formula = Callable[[PipelineSettings, dict[str, float]], float]


def _n(x: Any) -> int:
    return len(x) if x else 0


def _sae_rows(s: PipelineSettings, o: dict[str, float]) -> float:
    return s.sae.tokens * _n(s.sae.layers) * s.sae.epochs if s.sae else 0.0


def _direction_layers(s: PipelineSettings) -> int:
    return _n(s.direction.layers) or int(0.8 * N_LAYERS)


def _broken_share(o: dict[str, float]) -> float:
    return o.get("stage1_broken", 0) / max(o.get("stage1_refused", 1), 1)


def _stage2_prompts(s: PipelineSettings, o: dict[str, float]) -> float:
    refused = s.candidates.n_prompts * o.get("refused_share", 1.0)
    return min(s.prune.max_prompts or 10**9, refused * _broken_share(o))


def with_stage2_prompts(s: PipelineSettings, o: dict[str, float], n: int) -> PipelineSettings:
    """`s` with the stage-1 prompts that bring n prompts to stage 2 at the measured rates, and no stage caps."""
    n_prompts = math.ceil(n / max(o.get("refused_share", 1.0) * _broken_share(o), 1e-9))
    return replace(s, candidates=replace(s.candidates, n_prompts=n_prompts), prune=replace(s.prune, max_prompts=None),
                   stage3=replace(s.stage3, max_prompts=None), redundancy=replace(s.redundancy, max_prompts=None))


def _pool(s: PipelineSettings, o: dict[str, float]) -> float:
    """Stage-2 pool: the stage-1 K (measured) at every candidate layer (the SAE layers less the excluded)."""
    layers = [l for l in (s.sae.layers if s.sae else ()) if l not in s.candidates.exclude_layers]
    return o.get("mean_k", 0) * len(layers)


def _controls_rows(s: PipelineSettings, o: dict[str, float]) -> float:
    """Controls: one clean run counting active features on every prompt of the population (population
    "refused": every prompt stage 1 took from its evaluation split, refused or not; "stage2": the stage-2
    prompts), the prompts taken (max_prompts) clean and at each k, then the stage-2 prompts among them at
    the stage-2 sets' size (obrien_size). The random controls are read from prune's checks, not run here."""
    stage2 = _stage2_prompts(s, o)
    population = s.candidates.n_prompts if s.controls.population == "refused" else stage2
    taken = min(s.controls.max_prompts or population, population)
    return population + taken * (1 + _n(s.controls.ks)) + min(stage2, taken)


def _coconot_prompts(s: PipelineSettings, o: dict[str, float]) -> float:
    """The CoCoNot prompts the taxonomy stage extracts: its subset's shipped prompts, the first n_coconot."""
    return len(taxonomy.coconot_prompts(s.taxonomy.subset, limit=s.n_coconot))


def _rounds(s: PipelineSettings, o: dict[str, float]) -> float:
    """K values evaluated per prompt: rounds of ks_per_round until the measured K is reached."""
    ks = sorted(s.candidates.ks)
    index = next((i for i, k in enumerate(ks) if k >= o.get("mean_k", ks[-1])), len(ks) - 1) + 1
    return min(len(ks), s.candidates.ks_per_round * math.ceil(index / s.candidates.ks_per_round))


FORMULAS: dict[str, tuple[str, Formula]] = {
    "saes": ("tokens x layers x epochs (training); collection: tokens; quality: layers x windows", _sae_rows),
    "direction": ("n_train x 2 + n_val x 2 x (layers + n_random + 2)",
                  lambda s, o: 2 * s.direction.n_train + 2 * s.direction.n_val * (_direction_layers(s)
                                                                                + s.direction.n_random + 2)),
    "candidates": ("n_prompts + refused x K-values swept (rounds of ks_per_round up to the measured K)",
                   lambda s, o: s.candidates.n_prompts + s.candidates.n_prompts * o.get("refused_share", 1.0)
                   * _rounds(s, o)),
    # checks per prompt: its set at every tau, then the selected set's two random controls (random, random_magnitude)
    "prune": ("stage-2 prompts x taus x seeds x (pool / N)   [+ taus + 2 checks per prompt]",
              lambda s, o: _stage2_prompts(s, o) * (_n(s.prune.taus) * _n(s.prune.seeds)
                                                    * _pool(s, o) / s.prune.block_size + _n(s.prune.taus) + 2)),
    "stage3": ("2 x limit (FM data) + stage-2 prompts x (ks + probe_ks)",
               lambda s, o: 2 * s.stage3.limit + _stage2_prompts(s, o) * (_n(s.stage3.ks) + _n(s.stage3.probe_ks))),
    "redundancy": ("stage-2 prompts x (3 + clamp values)",
                   lambda s, o: _stage2_prompts(s, o) * (3 + _n(s.redundancy.clamp_values))),
    "controls": ("population (counting run) + taken x (1 + ks) + stage-2 prompts taken (obrien_size)",
                 _controls_rows),
    "costs": ("(n_alpaca + n_text) x conditions + n_xstest x conditions",
              lambda s, o: (s.costs.n_alpaca + s.costs.n_text + s.costs.n_xstest) * _n(s.costs.conditions)),
    "taxonomy": ("CoCoNot prompts of the taxonomy subset, the first n_coconot (None: all shipped)",
                 _coconot_prompts),
}


def _sae_seconds(store: Store, model: str, w: Work, measured: PipelineSettings, target: PipelineSettings,
                 ratio: float) -> float:
    """The SAE stage at the target: collection is one forward over the training tokens for every layer at once
    (it scales with the tokens); training (each SAE's recorded train_seconds) with tokens x layers x epochs
    (`ratio`); each layer's quality pass (its seconds less training) with the layers and the held-out windows;
    the rest of the stage with the layers."""
    if not (target.sae and measured.sae):
        return w.seconds
    m = [json.loads(x) for x in store.sql("SELECT metrics FROM saes WHERE model = ? AND metrics IS NOT NULL",
                                          [model])["metrics"].to_list()]
    train = sum(x.get("train_seconds", 0.0) for x in m)
    quality = sum(x.get("seconds", 0.0) for x in m) - train
    layers = _n(target.sae.layers) / max(_n(measured.sae.layers), 1)
    windows = ((target.sae.eval_windows + target.sae.ce_windows)
               / (measured.sae.eval_windows + measured.sae.ce_windows))
    rest = w.seconds - w.run_seconds - train - quality
    return (w.run_seconds * target.sae.tokens / measured.sae.tokens + train * ratio + quality * layers * windows
            + rest * layers)


def _generate(stage: str, s: PipelineSettings) -> int:
    by_stage = {"direction": s.direction.generate, "candidates": s.candidates.generate, "prune": s.prune.generate,
                "stage3": s.stage3.generate, "redundancy": s.redundancy.generate, "costs": s.costs.generate}
    return by_stage.get(stage, 0) or 0


def run_rates(work: dict[str, Work]) -> tuple[float, float, float]:
    """Least squares over every run: seconds = a + b x prompt tokens + c x decode steps (each clipped at 0)."""
    data = np.concatenate([w.per_run for w in work.values() if len(w.per_run)])
    coef, *_ = np.linalg.lstsq(data[:, 1:], data[:, 0], rcond=None)
    return tuple(float(max(x, 0.0)) for x in coef)


def settings_of(profile: str) -> PipelineSettings:
    return PipelineSettings.from_dict(read_profile(profile, N_LAYERS))


def recorded_settings(store: Store, model: str, profile: str) -> PipelineSettings:
    """The settings the store's stages actually ran with (the profile file may have changed since)."""
    raw: dict[str, Any] = {"profile": profile}
    rows = store.sql("SELECT stage, settings FROM pipeline_stages WHERE model = ? AND profile = ?", [model, profile])
    for stage, settings in rows.iter_rows():
        settings = json.loads(settings)
        if stage == "saes":
            raw["sae"] = settings
        elif stage == "taxonomy":
            raw["n_coconot"] = settings.get("n_coconot")
            raw["taxonomy"] = settings.get("taxonomy", {})
        elif stage in FORMULAS:
            raw[stage] = {k: v for k, v in settings.items() if v is not None}
    return PipelineSettings.from_dict(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="a store that `cli.py run` filled")
    ap.add_argument("--model", default="qwen-coder-0.5b")
    ap.add_argument("--profile", default="quick", help="the profile recorded in the store")
    ap.add_argument("--predict", default="default", help="the profile to predict")
    ap.add_argument("--stage2-prompts", type=int, default=None,
                    help="predict with enough stage-1 prompts to bring this many prompts to stage 2")
    args = ap.parse_args()

    store = Store.open(args.store)
    work = stage_work(store, args.model, args.profile)
    if not work:
        sys.exit(f"error: {args.store} records no stage of profile {args.profile!r} for {args.model}")
    print(f"measured: profile {args.profile} in {args.store}")
    print(f"{'stage':<11} {'runs':>5} {'rows':>7} {'prompt tok':>10} {'gen tok':>9} {'seconds':>8} "
          f"{'s/1k tok':>8} {'in runs':>7}")
    for stage, w in work.items():
        tokens = w.prompt_tokens + w.generated_tokens
        per_k = f"{1000 * w.seconds / tokens:8.2f}" if tokens else f"{'-':>8}"
        share = f"{w.run_seconds / w.seconds:7.0%}" if w.seconds else f"{'-':>7}"
        print(f"{stage:<11} {w.runs:>5} {w.rows:>7} {w.prompt_tokens:>10} {w.generated_tokens:>9} "
              f"{w.seconds:>8.0f} {per_k} {share}")
    total = sum(w.seconds for w in work.values())
    print(f"{'total':<11} {'':>5} {'':>7} {'':>10} {'':>9} {total:>8.0f}")

    measured, target = recorded_settings(store, args.model, args.profile), settings_of(args.predict)
    o = outcomes(store, args.model)
    o["refused_share"] = o.get("stage1_refused", 0) / max(o.get("stage1_prompts", 1), 1)
    # stage 2 runs one extraction run per lockstep step: as many as the largest pool has blocks
    o["blocks_ratio"] = (_pool(target, o) / target.prune.block_size + 2) / max(o.get("mean_blocks", 1) + 2, 1)
    print(f"\noutcomes measured: {', '.join(f'{k} {v:.3g}' for k, v in o.items())}")
    if args.stage2_prompts:
        target = with_stage2_prompts(target, o, args.stage2_prompts)
        print(f"for {args.stage2_prompts} stage-2 prompts: {target.candidates.n_prompts} stage-1 prompts "
              f"({o['refused_share']:.0%} refused, {_broken_share(o):.0%} of those jailbroken), no max_prompts")
    alpha, beta, gamma = run_rates(work)
    print(f"run time fitted over {sum(w.runs for w in work.values())} runs: {alpha:.2f} s per run + "
          f"{1000 * beta:.1f} s per 1k prompt tokens + {gamma:.3f} s per decode step (batch x token)")
    print(f"\ncost model: forward rows per stage; predicted for profile {args.predict}")
    print(f"{'stage':<11} {'formula':<84} {'c':>5} {'rows':>9} {'pred rows':>10} {'pred s':>8}")
    predicted = 0.0
    for stage, w in work.items():
        if stage not in FORMULAS:
            continue
        text, formula = FORMULAS[stage]
        here, there = formula(measured, o), formula(target, o)
        rows_measured = here if stage == "saes" else w.rows
        c = rows_measured / here if here else 1.0
        ratio = c * there / rows_measured if rows_measured else 1.0
        g_here, g_there = _generate(stage, measured), _generate(stage, target)
        outside = w.seconds - w.run_seconds                  # training, fitting, judging, bookkeeping
        if stage == "saes":
            seconds = _sae_seconds(store, args.model, w, measured, target, ratio)
        else:
            runs = w.runs * (o.get("blocks_ratio", 1.0) if stage == "prune" else 1.0)
            decode = w.decode_steps * ratio * (g_there / g_here if g_here else 1.0)
            seconds = outside + alpha * runs + beta * w.prompt_tokens * ratio + gamma * decode
        predicted += seconds
        print(f"{stage:<11} {text:<84} {c:>5.2f} {rows_measured:>9.0f} {c * there:>10.0f} {seconds:>8.0f}")
    print(f"\npredicted total for {args.predict}: {predicted / 60:.0f} min "
          f"({predicted / max(total, 1):.1f}x the measured {total / 60:.0f} min of {args.profile})")


if __name__ == "__main__":
    main()
