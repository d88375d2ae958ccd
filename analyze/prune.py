"""Stage 2 (paper Algorithm 1): greedy pruning of a prompt's candidate set to a minimal set.

P(S) is P("I") at the last prompt position with the features S zero-ablated. Algorithm 1 as printed:
    K <- {}; while |C\\K| >= N: draw a block V of N features from C\\K,
        delta = |P(C\\K) - P(C\\(K u V))| / P(C\\K);  delta >= tau: K <- K u V,  else: C <- C\\V;
    return K.
The pseudocode and the prose disagree. Read literally, an accepted block leaves the ablated set C\\K
just as a rejected one leaves C; the prose says "iteratively remove features that do not cause a
substantial change", i.e. accepted blocks stay ablated. `variant` picks the reading; in both, K is the
accepted blocks (decision "keep"), the rejected ones are removed from C ("prune"), and the run's set is K:
- prose (default; backward elimination, what this module always did): before a step the ablated set
  is C, the pool less the rejected blocks (the accepted and the untested ones); the block is tested by
  restoring it, C\\V. So "P(C\\K)" is read as P(C) and "P(C\\(K u V))" as P(C\\V): the printed formula
  with C the fixed pool and K the features rejected so far. The base value changes only on a rejection.
- literal (the pseudocode as printed): before a step the ablated set is C\\K, the blocks not yet tested
  (this one included: accepted and rejected blocks are both restored), and the test set C\\(K u V) is the
  untested blocks after this one. A block is judged by what restoring it does while only the blocks after
  it are ablated; the base value is the previous test value after either decision.
Both agree until the first acceptance. Neither recomputes a base value: it is always one measured before.

The pool (C at the start: the stage-1 set at the prompt's chosen K) is shuffled with the seed and cut
into blocks of N (drawing blocks without replacement). When
N does not divide |C| the last block is smaller than N. `last_block = "test"` (default, and what this
module always did: a deviation from the printed `while |C\\K| >= N`) tests it like the others; "skip"
stops as printed: the remainder is never tested, stays ablated in every step of either reading (it is
in C\\K throughout) and is not in K, so not in the run's set. A prompt's set for tau is the intersection
of its runs' sets over the seeds (kept under all seeds).

The 8 taus x 3 seeds x prompts runs are independent; they advance in lockstep: every step is ONE
extraction run whose items carry each run's own ablation set (identical (prompt, set) pairs, common
early on because a seed's order is shared by its taus, are computed once); `algorithm1` is that loop
over any P("I") measurement, `lockstep_prune` feeds it the model. Then each prompt's sets are ablated
with generation and judged, beside a control of as many random features active on the prompt (same
layers, drawn from the clean run's SAE activations at any position).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from analyze import catalog
from analyze.bisect import BASES as BISECT_BASES
from analyze.descend import TAU_SEARCHES
from analyze.catalog import latest_analysis, save_analysis
from analyze.common import (Evaluated, Feature, Log, ablation, analysis_id, evaluate, load_saes, model_key, no_log,
                            stored_prompts)
from analyze.judges import Judge, get_judge, judge_run
from extract.datasets import Prompt
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef, extract, make_items
from store import Store, UsageError
from analyze.settings import JudgedPromptSettings
from analyze.metrics import Paired, p_text, rate_ci, rate_text
from analyze.text import fmt

POOLS = ("candidates", "active")
VARIANTS = ("prose", "literal")          # the two readings of Algorithm 1 (module docstring)
LAST_BLOCKS = ("test", "skip")
ORDERS = ("random", "attribution", "bisect", "gallop")   # random: the paper's; the others read an attribution analysis


@dataclass(frozen=True)
class PruneSettings(JudgedPromptSettings):
    candidates_id: str | None = None     # None: the newest candidates analysis of the model
    block_size: int = 5                  # N in Algorithm 1
    taus: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    seeds: tuple[int, ...] = (0, 1, 2)
    pool: str = "candidates"             # candidates: C_K as stage 1 ablated it; active: C_K ∩ latents
                                         # active on the prompt (clean run, any position)
    dedupe: bool = True                  # identical (prompt, set) rows of a step share one forward
    control_seed: int = 0
    variant: str = "prose"               # prose: accepted blocks stay ablated; literal: the pseudocode as printed
    last_block: str = "test"             # a last block of fewer than N: test it, or skip it as printed
    ablate_first: bool = True            # zero-ablate at position 0 too (the sink the SAEs never saw; README)
    magnitude_bins: int = 4              # the magnitude-matched control draws from the same quantile bin (4: quartiles)
    order: str = "random"                # random: the seed's permutation (paper); attribution: least |attribution|
                                         # first (ties in the seed's order); bisect: analyze/bisect.py;
                                         # gallop: growing blocks in attribution order (analyze/gallop.py)
    attribution_id: str | None = None    # order attribution or bisect: None = the newest attribution analysis
    bisect_base: str = "pool"            # order bisect: delta against P(C) (pool) or the last passing prefix
    tau_search: str = "sweep"            # sweep: every tau judged (paper); descending: largest first, a prompt
                                         # stops at its first jailbreaking tau (analyze/descend.py)
    refine: bool = False                 # search each jailbreaking selected set again with blocks of one

    # added after prune ids were first made: hashed only when set, so prose/test runs keep their ids
    _HASHED_WHEN_SET = JudgedPromptSettings._HASHED_WHEN_SET + ("variant", "last_block", "ablate_first",
                                                                "magnitude_bins", "order", "attribution_id",
                                                                "bisect_base", "tau_search", "refine")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise UsageError(f"block_size must be >= 1, got {self.block_size}")
        if not self.taus or any(not 0 < t for t in self.taus):
            raise UsageError(f"taus must be > 0, got {self.taus}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds must be distinct, got {self.seeds}")
        if self.pool not in POOLS:
            raise UsageError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.variant not in VARIANTS:
            raise UsageError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.last_block not in LAST_BLOCKS:
            raise UsageError(f"last_block must be one of {', '.join(LAST_BLOCKS)}, got {self.last_block!r}")
        if self.magnitude_bins < 1:
            raise UsageError(f"magnitude_bins must be >= 1, got {self.magnitude_bins}")
        if self.order not in ORDERS:
            raise UsageError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.bisect_base not in BISECT_BASES:
            raise UsageError(f"bisect_base must be one of {', '.join(BISECT_BASES)}, got {self.bisect_base!r}")
        if self.tau_search not in TAU_SEARCHES:
            raise UsageError(f"tau_search must be one of {', '.join(TAU_SEARCHES)}, got {self.tau_search!r}")
        if self.refine and self.order == "random":
            raise UsageError("refine searches in attribution order: use it with --order attribution, bisect or gallop")
        if self.bisect_base != "pool" and self.order != "bisect":
            raise UsageError("bisect_base applies to --order bisect only")


@dataclass
class _Run:
    """One (prompt, tau, seed) run of Algorithm 1."""

    prompt: int
    tau: float
    seed: int
    blocks: list[list[Feature]]
    p_base: float                        # P("I") with the step's base set ablated (module docstring)
    kept: set[Feature] = field(default_factory=set)      # K: the accepted blocks
    pruned: set[Feature] = field(default_factory=set)    # the rejected blocks, removed from C


@dataclass(frozen=True)
class PruneTrace:
    steps: pl.DataFrame                  # `pruning_steps` rows without prune_id
    kept: dict[tuple[int, float, int], frozenset[Feature]]   # (prompt index, tau, seed) -> K at the end
    n_steps: int
    n_evaluations: int                   # P("I") measurements asked for (one per live run per step)
    n_forward_items: int                 # rows actually run (after dedupe)
    seconds: float


@dataclass(frozen=True)
class PruneResult:
    prune_id: str
    candidates_id: str
    per_prompt: pl.DataFrame = field(repr=False)
    per_tau: pl.DataFrame = field(repr=False)
    summary: dict[str, Any] = field(default_factory=dict)


def run(store: Store, model: LoadedModel, settings: PruneSettings, log: Log = no_log) -> PruneResult:
    """Algorithm 1 for every chosen stage-1 prompt, then the jailbreak check of the minimal sets."""
    t0 = time.perf_counter()
    judge = get_judge(settings.judge)
    cand = latest_analysis(store, "candidates", model.name, settings.candidates_id)
    chosen = store.sql("SELECT prompt_id, k, p_i FROM candidate_sets WHERE candidates_id = ? AND chosen "
                       "ORDER BY prompt_id", [cand["analysis_id"]]).head(settings.max_prompts or 10**9)
    if chosen.is_empty():
        raise UsageError(f"stage 1 ({cand['analysis_id']}) jailbroke no prompt, so there is nothing to prune; "
                         "run `analyze candidates` with more prompts or larger K")
    excluded = set(cand["settings"].get("exclude_layers", ()))
    saes = [s for s in load_saes(store, model, cand["settings"].get("saes", ())) if s.layer not in excluded]
    attribution_id = (latest_analysis(store, "attribution", model.name, settings.attribution_id)["analysis_id"]
                      if settings.order != "random" else None)      # the scores that order the blocks: an input
    pid = analysis_id("prune", model_key(model), cand["analysis_id"], settings,
                      {"attribution_id": attribution_id} if attribution_id else None)
    prompts = stored_prompts(store, chosen["prompt_id"].to_list())
    pools = _stage1_sets(store, cand["analysis_id"], prompts)
    active = _active_features(store, model, prompts, saes)
    p_full = chosen["p_i"].to_numpy().astype(np.float64)
    stage1_first = cand["settings"].get("ablate_first", True)
    if settings.pool == "candidates" and stage1_first != settings.ablate_first:
        # P(C) is stage 1's, measured with its own position-0 rule: the blocks must be ablated the same way
        raise UsageError(f"stage 1 ({cand['analysis_id']}) ablated {'with' if stage1_first else 'without'} position "
                         f"0, so prune must too: give both the same --ablate-first/--no-ablate-first")
    if settings.pool == "active":
        pools = [pool & act for pool, act in zip(pools, active)]
        p_full = evaluate(store, model, prompts, [ablation(sorted(p), settings.ablate_first) for p in pools],
                          saes, _quiet(settings.batch_size, 0)).p_i
    log(f"pruning {len(prompts)} prompts x {len(settings.taus)} taus x {len(settings.seeds)} seeds, "
        f"pools of {min(map(len, pools))}..{max(map(len, pools))} features")
    scores = None
    if settings.order != "random":
        from analyze.attribution import importance
        _, by_prompt = importance(store, model.name, attribution_id, [p.prompt_id for p in prompts])
        scores = [by_prompt[p.prompt_id] for p in prompts]
    trace, sets, frame, refined = search_and_judge(store, model, saes, prompts, pools, p_full, scores, judge,
                                                   settings, log)
    log("checking the selected sets' random controls")
    checks = _with_controls(store, model, prompts, sets, frame, active, saes, judge, settings, log)
    per_prompt, per_tau, summary = _summaries(prompts, pools, sets, checks)
    summary.update(seconds_pruning=trace.seconds, seconds_total=time.perf_counter() - t0,
                   seconds_per_prompt=trace.seconds / len(prompts), n_steps=trace.n_steps,
                   n_evaluations=trace.n_evaluations, n_forward_items=trace.n_forward_items,
                   n_judged_sets=int((~checks["kind"].is_in(list(CONTROLS))).sum()))
    if settings.tau_search != "sweep":
        summary.update(tau_search=settings.tau_search)
    if refined is not None:
        summary.update(refine=refined)
    if scores is not None:
        summary.update(order=settings.order, attribution_id=attribution_id)
        if settings.order == "bisect":
            summary.update(bisect_base=settings.bisect_base)
    steps = trace.steps.with_columns(pl.lit(pid).alias("prune_id"))
    save_analysis(store, pid, "prune", model.name, cand["analysis_id"], judge.judge_id, settings, summary,
                  {"pruning_steps": ("prune_id", steps),
                   "feature_sets": ("set_id", _feature_rows(pid, prompts, sets, checks)),
                   "set_checks": ("set_id", checks.with_columns(pl.lit(pid).alias("set_id"))),
                   "paired_tests": ("analysis_id", paired_frame(pid, summary))})
    return PruneResult(pid, cand["analysis_id"], per_prompt, per_tau, summary)


def search_and_judge(store: Store, model: LoadedModel, saes: list[SaeRef], prompts: list[Prompt],
                     pools: list[set[Feature]], p_full: np.ndarray, scores: list[dict[Feature, float]] | None,
                     judge: Judge, settings: PruneSettings, log: Log = no_log):
    """The search over every tau (or taus largest first), each (prompt, tau) set judged, then the refinement
    when asked (analyze/descend.py): (trace, sets, judged 'set' frame with `selected`, refine counts or None)."""
    if settings.tau_search == "descending":
        from analyze.descend import descending
        trace, sets, frame = descending(store, model, saes, prompts, pools, p_full, scores, judge, settings, log)
    else:
        trace = lockstep_prune(store, model, saes, prompts, pools, p_full, settings, log, scores)
        sets = minimal_sets(trace.kept, len(prompts), settings)
        log(f"checking {len(sets)} minimal sets")
        frame = _judge_sets(store, model, prompts, sets, saes, judge, settings, log)
    if not settings.refine:
        return trace, sets, frame, None
    from analyze.descend import refine
    return refine(store, model, saes, prompts, trace, sets, frame, scores, judge, settings, log)


def lockstep_prune(store: Store, model: LoadedModel, saes: list[SaeRef], prompts: list[Prompt],
                   pools: list[set[Feature]], p_full: np.ndarray, settings: PruneSettings,
                   log: Log = no_log, scores: list[dict[Feature, float]] | None = None,
                   extract_settings: ExtractSettings | None = None,
                   cache: dict[tuple[str, str], tuple[str, int, float]] | None = None,
                   drift: bool = True) -> PruneTrace:
    """Algorithm 1 for every (prompt, tau, seed), all advancing together: one extraction run per step.

    Each step's forwards start at the step's first ablated layer from the stored clean residual
    (extract/prefix.py); `extract_settings` overrides the step runs' settings (bench/bench_prune.py).
    `scores` (prompt index -> attribution score per feature) order the blocks (order attribution) or drive
    the bisection (order bisect, analyze/bisect.py). With `cache` ((prompt id, spec hash) -> (run, item, P)),
    shared by several calls (analyze/descend.py), a (prompt, set) measured before is read, not run again.
    `drift` False keeps gallop's base at P(pool) (analyze/gallop.py)."""
    step_settings = extract_settings or _quiet(settings.batch_size, 0)

    def measure(rows: list[int], ablated: list[list[Feature]]) -> Evaluated:
        specs = [ablation(a, settings.ablate_first) for a in ablated]
        if cache is None or not settings.dedupe:
            return evaluate(store, model, [prompts[i] for i in rows], specs, saes, step_settings,
                            dedupe=settings.dedupe)
        keys = [(prompts[i].prompt_id, spec.spec_hash()) for i, spec in zip(rows, specs)]
        missing = [k for k, key in enumerate(keys) if key not in cache]
        run_id, n_forward = "", 0
        if missing:
            done = evaluate(store, model, [prompts[rows[k]] for k in missing], [specs[k] for k in missing], saes,
                            step_settings)
            for j, k in enumerate(missing):
                cache[keys[k]] = (done.run_id, int(done.items[j]), float(done.p_i[j]))
            run_id, n_forward = done.run_id, done.n_forward_items
        got = [cache[key] for key in keys]
        return Evaluated(run_id or got[0][0], np.array([g[1] for g in got], dtype=np.int64),
                         np.array([g[2] for g in got]), [None] * len(got), n_forward, not missing,
                         tuple(g[0] for g in got))
    prompt_ids = [p.prompt_id for p in prompts]
    if settings.order == "bisect":
        from analyze.bisect import bisect_prune
        return PruneTrace(*bisect_prune(pools, p_full, settings.taus, settings.seeds, scores, measure, prompt_ids,
                                        _STEP_SCHEMA, log, settings.bisect_base))
    if settings.order == "gallop":
        from analyze.gallop import gallop_prune
        return PruneTrace(*gallop_prune(pools, p_full, settings.taus, settings.seeds, scores, settings.block_size,
                                        measure, prompt_ids, _STEP_SCHEMA, log, drift))
    return algorithm1(pools, p_full, settings, measure, prompt_ids, log, scores)


Measure = Callable[[list[int], list[list[Feature]]], Evaluated]   # (prompt indices, ablation sets) -> P("I")


def algorithm1(pools: list[set[Feature]], p_full: np.ndarray, settings: PruneSettings, measure: Measure,
               prompt_ids: list[str], log: Log = no_log,
               scores: list[dict[Feature, float]] | None = None) -> PruneTrace:
    """Algorithm 1 for every (prompt, tau, seed) in lockstep, one `measure` call per step for all live runs.

    `p_full[i]` is P(pool i ablated), the first base value of both readings."""
    t0 = time.perf_counter()
    runs = [_Run(i, tau, seed, _blocks(pool, seed, settings, scores[i] if scores else None), float(p_full[i]))
            for i, pool in enumerate(pools) for seed in settings.seeds for tau in settings.taus]
    n_steps = max((len(r.blocks) for r in runs), default=0)
    rows: list[dict[str, Any]] = []
    n_eval = n_items = 0
    for step in range(n_steps):
        live = [r for r in runs if step < len(r.blocks)]
        tests = [sorted(_ablated(r, pools[r.prompt], settings.variant) - set(r.blocks[step])) for r in live]
        done = measure([r.prompt for r in live], tests)
        n_eval, n_items = n_eval + len(live), n_items + done.n_forward_items
        for k, (r, p_without, item) in enumerate(zip(live, done.p_i, done.items)):
            rows.append(_decide(r, step, float(p_without), done.run_of(k), int(item), pools[r.prompt],
                                prompt_ids, settings.variant))
        log(f"step {step + 1}/{n_steps}: {len(live)} runs, {done.n_forward_items} forwards")
    kept = {(r.prompt, r.tau, r.seed): frozenset(r.kept) for r in runs}
    steps = pl.DataFrame(rows, schema=_STEP_SCHEMA)
    return PruneTrace(steps, kept, n_steps, n_eval, n_items, time.perf_counter() - t0)


def minimal_sets(kept: dict[tuple[int, float, int], frozenset[Feature]], n_prompts: int,
                 settings: PruneSettings) -> dict[tuple[int, float], frozenset[Feature]]:
    """(prompt index, tau) -> the features its runs kept under every seed."""
    return {(i, tau): frozenset.intersection(*(kept[(i, tau, s)] for s in settings.seeds))
            for i in range(n_prompts) for tau in settings.taus}


def _blocks(pool: set[Feature], seed: int, settings: PruneSettings,
            scores: dict[Feature, float] | None = None) -> list[list[Feature]]:
    """The pool in the seed's order cut into blocks of N; under `last_block = "skip"` none smaller than N.

    With `scores` (order attribution) the seed's order is stably re-sorted by |attribution score|, least
    first, so the latents predicted to matter are tested last, when little else is left to prune."""
    ordered, n = sorted(pool), settings.block_size
    order = np.random.default_rng(seed).permutation(len(ordered))
    if scores is not None:
        order = np.array(sorted(order, key=lambda j: abs(scores.get(ordered[j], 0.0))), dtype=np.int64)
    blocks = [[ordered[j] for j in order[s:s + n]] for s in range(0, len(order), n)]
    if settings.last_block == "skip" and blocks and len(blocks[-1]) < n:
        blocks.pop()
    return blocks


def _ablated(r: _Run, pool: set[Feature], variant: str) -> set[Feature]:
    """The base set before r's next block: C (prose) or C\\K (literal), C being the pool less the rejected."""
    return pool - r.pruned - (r.kept if variant == "literal" else set())


_STEP_SCHEMA = {"prompt_id": pl.String, "tau": pl.Float32, "seed": pl.Int32, "step": pl.Int32,
                "block_layers": pl.List(pl.Int16), "block_features": pl.List(pl.Int32), "p_base": pl.Float32,
                "p_without": pl.Float32, "delta": pl.Float32, "decision": pl.String, "n_ablated": pl.Int32,
                "run_id": pl.String, "item": pl.Int32}


def _decide(r: _Run, step: int, p_without: float, run_id: str, item: int, pool: set[Feature],
            prompt_ids: list[str], variant: str) -> dict[str, Any]:
    """One block decision of Algorithm 1; updates the run and returns its `pruning_steps` row."""
    block = r.blocks[step]
    p_base = r.p_base
    delta = abs(p_base - p_without) / p_base
    keep = delta >= r.tau
    (r.kept if keep else r.pruned).update(block)
    if not keep or variant == "literal":     # the next base set is this step's test set
        r.p_base = p_without
    return {"prompt_id": prompt_ids[r.prompt], "tau": r.tau, "seed": r.seed, "step": step,
            "block_layers": [f[0] for f in block], "block_features": [f[1] for f in block],
            "p_base": p_base, "p_without": p_without, "delta": delta, "decision": "keep" if keep else "prune",
            "n_ablated": len(_ablated(r, pool, variant)), "run_id": run_id, "item": item}


def _quiet(batch_size: int, generate: int) -> ExtractSettings:
    """Last-token runs for P("I") (and completions), storing no residuals and no SAE rows."""
    return ExtractSettings(positions="last:1", generate=generate, batch_size=batch_size, sae_rows=False)


def _stage1_sets(store: Store, candidates_id: str, prompts: list[Prompt]) -> list[set[Feature]]:
    by_prompt = catalog.feature_sets(store, candidates_id, stage=1, selected=False)
    return [set(by_prompt.get(p.prompt_id, ())) for p in prompts]


def _active_features(store: Store, model: LoadedModel, prompts: list[Prompt],
                     saes: list[SaeRef]) -> list[set[Feature]]:
    """Latents active (> 0) at any position of each prompt's clean run, at the SAE layers."""
    result = extract(store, model, make_items(model, prompts), saes, ExtractSettings(positions="all"))
    df = store.sql("SELECT DISTINCT i.item, a.layer, a.feature FROM sae_acts a JOIN tokens t USING (run_id, row) "
                   "JOIN items i ON i.run_id = t.run_id AND i.item = t.item WHERE a.run_id = ?", [result.run_id])
    active: list[set[Feature]] = [set() for _ in prompts]
    for item, layer, feature in df.iter_rows():
        active[item].add((int(layer), int(feature)))
    return active


def _judge_sets(store, model, prompts: list[Prompt], sets: dict[tuple[int, float], frozenset[Feature]], saes,
                judge: Judge, settings: PruneSettings, log: Log) -> pl.DataFrame:
    """Each (prompt, tau) set ablated and judged, one run; each prompt's selected set flagged."""
    keys = sorted(sets)
    return _select(_judged(store, model, [prompts[i] for i, _ in keys], [sets[k] for k in keys], saes, judge,
                           settings, log).with_columns(pl.Series("tau", [t for _, t in keys], pl.Float64),
                                                  pl.lit("set").alias("kind")))


def _with_controls(store, model, prompts: list[Prompt], sets: dict[tuple[int, float], frozenset[Feature]],
                   frame: pl.DataFrame, active: list[set[Feature]], saes, judge: Judge, settings: PruneSettings,
                   log: Log) -> pl.DataFrame:
    """The judged sets and two random controls for each prompt's selected set: as many active features per
    layer (random), and active features from the same activation quantiles (random_magnitude)."""
    index = {p.prompt_id: i for i, p in enumerate(prompts)}
    picked = frame.filter((pl.col("kind") == "set") & pl.col("selected"))
    chosen = sorted((index[p], tau) for p, tau in picked.select("prompt_id", "tau").iter_rows())
    values = _activation_values(store, model, prompts, saes)
    controls = {"random": [_random_like(sets[(i, tau)], active[i], settings.control_seed, i) for i, tau in chosen],
                "random_magnitude": [_random_magnitude(sets[(i, tau)], values[i], settings.control_seed, i,
                                                       settings.magnitude_bins) for i, tau in chosen]}
    parts = [frame]
    for kind, drawn in controls.items():
        judged = _judged(store, model, [prompts[i] for i, _ in chosen], drawn, saes, judge, settings, log)
        parts.append(judged.with_columns(pl.Series("tau", [t for _, t in chosen], pl.Float64),
                                         pl.lit(kind).alias("kind"), pl.lit(True).alias("selected")).select(frame.columns))
    return pl.concat(parts).with_columns(pl.lit(2, pl.Int8).alias("stage"))


def _judged(store, model, prompts: list[Prompt], feature_sets: list[frozenset[Feature] | set[Feature]], saes,
            judge: Judge, settings: PruneSettings, log: Log) -> pl.DataFrame:
    """Ablate each set on its prompt (one run, with generation when the judge reads completions) and judge."""
    generate = settings.generate if judge.needs_completion else 0
    done = evaluate(store, model, prompts, [ablation(sorted(f), settings.ablate_first) for f in feature_sets],
                    saes, _quiet(settings.batch_size, generate), log=log)
    verdicts = judge_run(store, done.run_id, judge)["verdict"].to_numpy()[done.items]
    return pl.DataFrame({
        "prompt_id": [p.prompt_id for p in prompts], "n_features": [len(f) for f in feature_sets],
        "run_id": [done.run_id] * len(prompts), "item": done.items, "p_i": done.p_i, "verdict": verdicts,
        "jailbroken": verdicts == "compliance"},
        schema_overrides={"n_features": pl.Int32, "item": pl.Int32, "p_i": pl.Float32})


def _select(frame: pl.DataFrame) -> pl.DataFrame:
    """Per prompt, the set reported: the largest tau whose set jailbreaks, else the smallest tau."""
    best = (frame.group_by("prompt_id").agg(
        pl.col("tau").filter(pl.col("jailbroken")).max().alias("best"), pl.col("tau").min().alias("lowest"))
        .select("prompt_id", pl.coalesce("best", "lowest").alias("chosen_tau")))
    return (frame.join(best, on="prompt_id").with_columns((pl.col("tau") == pl.col("chosen_tau")).alias("selected"))
            .drop("chosen_tau"))


def _random_like(chosen: frozenset[Feature], active: set[Feature], seed: int, prompt: int) -> set[Feature]:
    """As many features as `chosen` per layer, drawn from the prompt's active ones outside `chosen`."""
    rng = np.random.default_rng([seed, prompt])
    out: set[Feature] = set()
    for layer in sorted({f[0] for f in chosen}):
        need = sum(1 for f in chosen if f[0] == layer)
        pool = sorted(f for f in active if f[0] == layer and f not in chosen)
        picks = rng.choice(len(pool), size=min(need, len(pool)), replace=False) if pool else []
        out |= {pool[j] for j in picks}
    return out


def _activation_values(store: Store, model: LoadedModel, prompts: list[Prompt],
                       saes: list[SaeRef]) -> list[dict[Feature, float]]:
    """Per prompt, each latent active at some position of its clean run (the run `_active_features` reads) with
    its largest activation there."""
    result = extract(store, model, make_items(model, prompts), saes, ExtractSettings(positions="all"))
    df = store.sql("SELECT t.item, a.layer, a.feature, max(a.value) AS value FROM sae_acts a JOIN tokens t "
                   "USING (run_id, row) WHERE a.run_id = ? GROUP BY ALL", [result.run_id])
    values: list[dict[Feature, float]] = [{} for _ in prompts]
    for item, layer, feature, value in df.iter_rows():
        values[item][(int(layer), int(feature))] = float(value)
    return values


def _random_magnitude(chosen: frozenset[Feature], values: dict[Feature, float], seed: int, prompt: int,
                      n_bins: int) -> set[Feature]:
    """Per active feature of `chosen`, a random other active feature of its layer from the same quantile bin of
    the prompt's activation values there (the nearest non-empty bin when that one is used up).

    A dormant member of `chosen` (zero on the prompt) is matched by nothing: its counterpart would be another
    dormant feature, whose zero-ablation changes nothing."""
    rng = np.random.default_rng([seed, prompt, 1])
    out: set[Feature] = set()
    for layer in sorted({f[0] for f in chosen}):
        at_layer = {f: v for f, v in values.items() if f[0] == layer}
        if not at_layer:
            continue
        edges = np.quantile(np.array(list(at_layer.values())), np.linspace(0, 1, n_bins + 1))[1:-1]
        bin_of = lambda v: int(np.searchsorted(edges, v, side="right"))            # noqa: E731
        pools: list[list[Feature]] = [[] for _ in range(n_bins)]
        for f in sorted(at_layer):
            if f not in chosen:
                pools[bin_of(at_layer[f])].append(f)
        for f in sorted(x for x in chosen if x in at_layer):
            home = bin_of(at_layer[f])
            for b in sorted(range(n_bins), key=lambda b: (abs(b - home), b)):
                if pools[b]:
                    out.add(pools[b].pop(int(rng.integers(len(pools[b])))))
                    break
    return out


CONTROLS = ("random", "random_magnitude")   # set_checks kinds of the selected sets' random controls


def _summaries(prompts, pools, sets, checks: pl.DataFrame):
    """Per prompt (selected set and its controls), per tau, and the paper's jailbreak table with intervals,
    set-size spread and paired tests of each set against its controls on the same prompts."""
    chosen = checks.filter((pl.col("kind") == "set") & pl.col("selected"))
    random = checks.filter(pl.col("kind") == "random").select(
        "prompt_id", pl.col("jailbroken").alias("random_jailbroken"), pl.col("n_features").alias("n_random"))
    per_prompt = (pl.DataFrame({"prompt_id": [p.prompt_id for p in prompts], "text": [p.text for p in prompts],
                                "pool": [len(p) for p in pools]})
                  .join(chosen.select("prompt_id", "tau", "n_features", "p_i", "verdict", "jailbroken"),
                        on="prompt_id").join(random, on="prompt_id", how="left"))
    per_tau = (checks.filter(pl.col("kind") == "set").group_by("tau")
               .agg(pl.len().alias("n_prompts"), pl.col("jailbroken").sum().alias("n_jailbroken"),
                    pl.col("n_features").mean().alias("mean_features"),
                    pl.col("n_features").std().alias("std_features")).sort("tau"))
    per_tau = per_tau.with_columns(
        pl.Series("ci_low", [rate_ci(k, n)["ci_low"] for k, n in per_tau.select("n_jailbroken", "n_prompts").iter_rows()]),
        pl.Series("ci_high", [rate_ci(k, n)["ci_high"] for k, n in per_tau.select("n_jailbroken", "n_prompts").iter_rows()]))
    index = {p.prompt_id: i for i, p in enumerate(prompts)}
    won = chosen.filter(pl.col("jailbroken"))
    features = {f for pid, tau in won.select("prompt_id", "tau").iter_rows() for f in sets[(index[pid], tau)]}
    per_layer: dict[str, int] = {}
    for layer, _ in sorted(features):
        per_layer[str(layer)] = per_layer.get(str(layer), 0) + 1
    n = len(prompts)
    summary = {"n_prompts": n, "n_jailbroken": won.height, **rate_ci(won.height, n),
               "n_random_jailbroken": int(per_prompt["random_jailbroken"].sum()),
               "n_unique_features": len(features),
               "features_per_prompt": float(won["n_features"].mean()) if won.height else None,
               "set_sizes": _spread(won["n_features"]), "set_sizes_selected": _spread(chosen["n_features"]),
               "per_layer_unique": per_layer, "per_tau": per_tau.to_dicts(), "controls": {}}
    for kind in CONTROLS:
        control = checks.filter(pl.col("kind") == kind)
        if control.is_empty():
            continue
        pairs = chosen.select("prompt_id", "jailbroken").join(
            control.select("prompt_id", pl.col("jailbroken").alias("control")), on="prompt_id")
        k_jb = int(control["jailbroken"].sum())
        summary["controls"][kind] = {"n_prompts": control.height, "n_jailbroken": k_jb,
                                     **rate_ci(k_jb, control.height),
                                     "mean_features": float(control["n_features"].mean()),
                                     "paired": Paired.of(pairs["jailbroken"], pairs["control"]).as_dict()}
    return per_prompt, per_tau, summary


def _spread(sizes: pl.Series) -> dict[str, float | int | None]:
    """Mean, std (ddof 1), min, median and max of set sizes; None where there are too few sets."""
    if sizes.is_empty():
        return {"n": 0, "mean": None, "std": None, "min": None, "median": None, "max": None}
    return {"n": sizes.len(), "mean": float(sizes.mean()), "std": float(sizes.std()) if sizes.len() > 1 else None,
            "min": int(sizes.min()), "median": float(sizes.median()), "max": int(sizes.max())}


def paired_frame(analysis_id_: str, summary: dict[str, Any]) -> pl.DataFrame:
    """`paired_tests` rows of a prune summary: the selected sets (stage2) against each of their controls."""
    tests = [("stage2", kind, 0, Paired(**{f: c["paired"][f] for f in ("n_both", "n_a_only", "n_b_only", "n_neither")}))
             for kind, c in summary.get("controls", {}).items()]
    return catalog.paired_tests_frame(analysis_id_, tests)


def _feature_rows(pid: str, prompts: list[Prompt], sets, checks: pl.DataFrame) -> pl.DataFrame:
    """`feature_sets` rows: every (prompt, tau) set, flagged where it is the prompt's selected one."""
    rows = [(prompts[i].prompt_id, tau, layer, feature) for (i, tau), fs in sets.items() for layer, feature in sorted(fs)]
    frame = pl.DataFrame(rows, schema={"prompt_id": pl.String, "tau": pl.Float64, "layer": pl.Int16,
                                       "feature": pl.Int32}, orient="row")
    chosen = checks.filter((pl.col("kind") == "set") & pl.col("selected")).select(
        "prompt_id", "tau", pl.lit(True).alias("selected"))
    return (frame.join(chosen, on=["prompt_id", "tau"], how="left")
            .with_columns(pl.col("selected").fill_null(False), pl.lit(pid).alias("set_id"),
                          pl.lit(2, pl.Int8).alias("stage"), pl.lit(None, pl.Float32).alias("score")))


def summary_line(r: PruneResult) -> str:
    """One line: prompts jailbroken by their minimal sets, set sizes, the random controls with McNemar, the work."""
    m = r.summary
    sizes = m.get("set_sizes") or {}
    spread = ((f" ± {sizes['std']:.1f}" if sizes.get("std") is not None else "")
              + (f" ({sizes['min']}..{sizes['max']})" if sizes.get("n") else ""))
    controls = "; ".join(f"{_CONTROL_NAMES[kind]} {rate_text(c['n_jailbroken'], c['n_prompts'])}, "
                         f"McNemar p = {p_text(c['paired']['p_value'])}" for kind, c in m.get("controls", {}).items())
    return (f"{m['n_jailbroken']}/{m['n_prompts']} prompts jailbroken by their minimal sets "
            f"({rate_text(m['n_jailbroken'], m['n_prompts'])}; {fmt(m['features_per_prompt'], '.1f')}{spread} features "
            f"per prompt, {m['n_unique_features']} unique); {controls or 'no random control'}; "
            f"{m['n_steps']} lockstep steps, {m['n_evaluations']} evaluations in {m['n_forward_items']} forward rows, "
            f"{m['seconds_pruning']:.0f} s")


_CONTROL_NAMES = {"random": "random active features of equal size",
                  "random_magnitude": "magnitude-matched random"}


def detail_lines(r: PruneResult) -> list[str]:
    """Per tau: ASR with its interval and set size (mean ± std); each control with its paired test; unique
    features per layer."""
    m = r.summary
    lines = [f"{'tau':>5} {'jailbroken':<22} {'features':>12}"]
    for row in r.per_tau.iter_rows(named=True):
        std = row.get("std_features")
        lines.append(f"{row['tau']:>5.1f} {rate_text(row['n_jailbroken'], row['n_prompts']):<22} "
                     f"{row['mean_features']:>6.1f}" + (f" ± {std:.1f}" if std is not None else ""))
    for kind, c in m.get("controls", {}).items():
        p = c["paired"]
        table = Paired(p["n_both"], p["n_a_only"], p["n_b_only"], p["n_neither"])
        lines.append(f"{_CONTROL_NAMES[kind]}: {rate_text(c['n_jailbroken'], c['n_prompts'])}, "
                     f"{c['mean_features']:.1f} features; sets minus control {table.text()}")
    lines.append("unique features per layer " + (" ".join(f"{k}:{v}" for k, v in m["per_layer_unique"].items()) or "-"))
    return lines
