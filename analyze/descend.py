"""Beyond the paper: stage 2 with fewer evaluations and smaller sets (`analyze prune --tau-search descending`,
`--refine`).

The paper runs every tau, judges every (prompt, tau) set and reports, per prompt, the set of the largest
tau that jailbreaks (analyze/prune.py `_select`). Two options change how that set is reached, not how a
search decides:

- **descending** (`tau_search = "descending"`): the taus run one at a time, largest first. After each
  tau its sets are judged, and a prompt whose set jailbreaks leaves: no smaller tau can be selected for
  it. The selected set is the one the full sweep selects (same search, same judge; tests below), but the
  prompts broken at a large tau never run the small ones. A prompt that no tau breaks runs them all, and
  its selected set is the smallest tau's, as in the sweep. Every measurement is kept in a cache keyed by
  (prompt, ablation set), so a later tau's search that repeats an earlier test (they share their start,
  and their history until a delta falls between the two taus) reads it instead of running a forward;
  the sweep gets the same sharing from running its taus in lockstep. `per_tau` then counts, at each tau,
  the prompts still searched there.
- **refine** (`refine = True`, orders with an attribution analysis): a jailbreaking selected set K is
  searched again at its own tau by gallop (analyze/gallop.py) with blocks of one and a fixed base: K is
  the pool, and a chunk of latents (least attributed first) is pruned when restoring it, beside those
  pruned before, keeps P("I") within tau of P(K). So everything pruned together moves P("I") by less
  than tau; with Algorithm 1's drifting base, one latent at a time, nearly every latent passes and the
  set empties (measured: 17 of 20 refined sets on the default model no longer jailbroke, most of them
  empty). The refined set is judged and replaces K only when it still jailbreaks. Blocks of N keep up to
  N - 1 passengers beside each latent that matters; Algorithm 1 sheds them by intersecting seeds, a
  search without a seed (gallop, bisect) never does. Its `pruning_steps` rows continue the tau's search (step
  numbers after its last step; blocks of one feature). In `set_checks` the replaced set stays as kind
  'unrefined', a rejected refinement is kind 'refined'; neither is selected.

Both are options; the default (sweep, no refinement) is the paper's protocol.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import polars as pl

from analyze.common import Feature, Log, no_log

TAU_SEARCHES = ("sweep", "descending")


def descending(store, model, saes, prompts, pools: list[set[Feature]], p_full: np.ndarray, scores, judge,
               settings, log: Log = no_log):
    """Taus largest first, each judged before the next; returns (trace, sets, judged 'set' frame with `selected`)."""
    from analyze.prune import PruneTrace, _judged, _select, lockstep_prune, minimal_sets

    t0, cache = time.perf_counter(), {}
    live = list(range(len(prompts)))
    steps, kept, frames, sets = [], {}, [], {}
    n_steps = n_eval = n_items = 0
    judging = 0.0
    for tau in sorted(settings.taus, reverse=True):
        if not live:
            break
        one = replace(settings, taus=(tau,))
        trace = lockstep_prune(store, model, saes, [prompts[i] for i in live], [pools[i] for i in live],
                               p_full[live], one, log, [scores[i] for i in live] if scores else None, cache=cache)
        steps.append(trace.steps)
        kept.update({(live[j], t, seed): fs for (j, t, seed), fs in trace.kept.items()})
        n_steps, n_eval, n_items = n_steps + trace.n_steps, n_eval + trace.n_evaluations, n_items + trace.n_forward_items
        found = {(live[j], t): fs for (j, t), fs in minimal_sets(trace.kept, len(live), one).items()}
        sets.update(found)
        t1 = time.perf_counter()
        frame = _judged(store, model, [prompts[i] for i, _ in found], list(found.values()), saes, judge, settings, log)
        judging += time.perf_counter() - t1
        frames.append(frame.with_columns(pl.Series("tau", [t for _, t in found], pl.Float64), pl.lit("set").alias("kind")))
        broken = set(frame.filter(pl.col("jailbroken"))["prompt_id"].to_list())
        live = [i for i in live if prompts[i].prompt_id not in broken]
        log(f"tau {tau}: {len(broken)} prompts jailbroken, {len(live)} go on to smaller taus")
    trace = PruneTrace(pl.concat(steps), kept, n_steps, n_eval, n_items, time.perf_counter() - t0 - judging)
    return trace, sets, _select(pl.concat(frames))


def refine(store, model, saes, prompts, trace, sets: dict[tuple[int, float], frozenset[Feature]],
           frame: pl.DataFrame, scores, judge, settings, log: Log = no_log):
    """Search each jailbreaking selected set again with blocks of one (module docstring).

    Returns (trace with the refinement's steps and evaluations added, sets, frame, summary counts)."""
    from analyze.prune import PruneTrace, _judged, lockstep_prune, minimal_sets

    t0, cache = time.perf_counter(), {}
    index = {p.prompt_id: i for i, p in enumerate(prompts)}
    won = frame.filter((pl.col("kind") == "set") & pl.col("selected") & pl.col("jailbroken"))
    last_step = {(prompt_id, tau): step for prompt_id, tau, step in trace.steps.group_by("prompt_id", "tau")
                 .agg(pl.col("step").max()).select("prompt_id", "tau", "step").iter_rows()}
    steps, refined = [trace.steps], {}
    n_steps, n_eval, n_items = trace.n_steps, trace.n_evaluations, trace.n_forward_items
    for tau in sorted(set(won["tau"].to_list()), reverse=True):
        group = won.filter(pl.col("tau") == tau)
        rows = [index[p] for p in group["prompt_id"]]
        one = replace(settings, taus=(tau,), block_size=1, order="gallop")
        sub = lockstep_prune(store, model, saes, [prompts[i] for i in rows], [set(sets[(i, tau)]) for i in rows],
                             group["p_i"].to_numpy().astype(np.float64), one, log,
                             [scores[i] for i in rows], cache=cache, drift=False)
        offsets = pl.DataFrame({"prompt_id": [prompts[i].prompt_id for i in rows],
                                "offset": [last_step.get((prompts[i].prompt_id, float(np.float32(tau))), -1) + 1
                                           for i in rows]})
        steps.append(sub.steps.join(offsets, on="prompt_id").with_columns((pl.col("step") + pl.col("offset"))
                                                                           .cast(pl.Int32)).drop("offset"))
        n_steps, n_eval, n_items = n_steps + sub.n_steps, n_eval + sub.n_evaluations, n_items + sub.n_forward_items
        refined.update({(rows[j], t): fs for (j, t), fs in minimal_sets(sub.kept, len(rows), one).items()})
    seconds = time.perf_counter() - t0
    keys = sorted(refined)
    stats = {"n_refined": len(keys), "n_refined_kept": 0, "refine_evaluations": n_eval - trace.n_evaluations,
             "refine_forward_items": n_items - trace.n_forward_items, "seconds_refining": seconds}
    if not keys:
        return trace, sets, frame, stats
    judged = _judged(store, model, [prompts[i] for i, _ in keys], [refined[k] for k in keys], saes, judge, settings,
                     log).with_columns(pl.Series("tau", [t for _, t in keys], pl.Float64))
    take = {prompts[i].prompt_id for (i, _), ok in zip(keys, judged["jailbroken"]) if ok}
    stats.update(n_refined_kept=len(take),
                 sizes_before=[len(sets[k]) for k in keys], sizes_after=[len(refined[k]) for k in keys])
    sets = {**sets, **{k: refined[k] for k in keys if prompts[k[0]].prompt_id in take}}
    selected = (pl.col("kind") == "set") & pl.col("selected") & pl.col("prompt_id").is_in(list(take))
    new_rows = judged.filter(pl.col("prompt_id").is_in(list(take))).with_columns(
        pl.lit("set").alias("kind"), pl.lit(True).alias("selected")).select(frame.columns)
    rejected = judged.filter(~pl.col("prompt_id").is_in(list(take))).with_columns(
        pl.lit("refined").alias("kind"), pl.lit(False).alias("selected")).select(frame.columns)
    frame = pl.concat([frame.with_columns(pl.when(selected).then(pl.lit("unrefined")).otherwise("kind").alias("kind"),
                                          (pl.col("selected") & ~selected).alias("selected")),
                       new_rows, rejected])
    steps_frame = pl.concat(steps)
    return (PruneTrace(steps_frame, trace.kept, n_steps, n_eval, n_items, trace.seconds + seconds),
            sets, frame, stats)
