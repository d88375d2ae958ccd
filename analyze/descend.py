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
  empty). The refined set is judged and replaces K when it still jailbreaks; when it does not, K is searched
  again at the next smaller tau of `taus` as the tolerance (a smaller tolerance prunes less), down to the
  smallest; K stays when none jailbreaks. Blocks of N keep up to
  N - 1 passengers beside each latent that matters; Algorithm 1 sheds them by intersecting seeds, a
  search without a seed (gallop, bisect) never does. Its `pruning_steps` rows continue the tau's search (step
  numbers after its last step, tau the set's tau; blocks of one feature; p_base is P(K) throughout and
  the tolerance of an attempt is the tau its deltas were held to). In `set_checks` the replaced set stays
  as kind 'unrefined', each rejected attempt is kind 'refined'; neither is selected.

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
    """Search each jailbreaking selected set again with blocks of one, down a ladder of tolerances
    (module docstring).

    Returns (trace with the refinement's steps and evaluations added, sets, frame, summary counts)."""
    from analyze.prune import PruneTrace, _judged, lockstep_prune, minimal_sets

    t0, cache, judging = time.perf_counter(), {}, 0.0
    index = {p.prompt_id: i for i, p in enumerate(prompts)}
    won = frame.filter((pl.col("kind") == "set") & pl.col("selected") & pl.col("jailbroken"))
    todo = {index[p]: (tau, float(p_i)) for p, tau, p_i in won.select("prompt_id", "tau", "p_i").iter_rows()}
    tau_of = {i: tau for i, (tau, _) in todo.items()}                  # each refined set's own tau
    tolerance = dict(tau_of)
    next_step = {(prompt_id, tau): step + 1 for prompt_id, tau, step in trace.steps.group_by("prompt_id", "tau")
                 .agg(pl.col("step").max()).select("prompt_id", "tau", "step").iter_rows()}
    steps, kept, checked, tried = [trace.steps], {}, [], {i: 0 for i in todo}
    n_steps, n_eval, n_items = trace.n_steps, trace.n_evaluations, trace.n_forward_items
    while todo:
        attempt: dict[int, frozenset[Feature]] = {}
        for tol in sorted({tolerance[i] for i in todo}, reverse=True):
            rows = sorted(i for i in todo if tolerance[i] == tol)
            one = replace(settings, taus=(tol,), block_size=1, order="gallop")
            sub = lockstep_prune(store, model, saes, [prompts[i] for i in rows], [set(sets[(i, todo[i][0])]) for i in rows],
                                 np.array([todo[i][1] for i in rows]), one, log, [scores[i] for i in rows],
                                 cache=cache, drift=False)
            n_steps, n_eval, n_items = n_steps + sub.n_steps, n_eval + sub.n_evaluations, n_items + sub.n_forward_items
            keys = [(prompts[i].prompt_id, float(np.float32(todo[i][0]))) for i in rows]
            at = pl.DataFrame({"prompt_id": [k[0] for k in keys], "set_tau": [k[1] for k in keys],
                               "offset": [next_step.get(k, 0) for k in keys]},
                              schema_overrides={"set_tau": pl.Float32, "offset": pl.Int32})
            moved = (sub.steps.join(at, on="prompt_id")
                     .with_columns((pl.col("step") + pl.col("offset")).cast(pl.Int32), pl.col("set_tau").alias("tau"))
                     .drop("offset", "set_tau"))
            steps.append(moved)
            last = dict(moved.group_by("prompt_id").agg(pl.col("step").max()).iter_rows())
            next_step.update({k: int(last[k[0]]) + 1 for k in keys})
            attempt.update({rows[j]: fs for (j, _), fs in minimal_sets(sub.kept, len(rows), one).items()})
        order, t1 = sorted(attempt), time.perf_counter()
        judged = _judged(store, model, [prompts[i] for i in order], [attempt[i] for i in order], saes, judge,
                         settings, log).with_columns(pl.Series("tau", [todo[i][0] for i in order], pl.Float64))
        judging += time.perf_counter() - t1
        checked.append(judged)
        for i, ok in zip(order, judged["jailbroken"]):
            tried[i] += 1
            if ok:
                kept[i] = attempt[i]
                del todo[i]
                continue
            lower = [t for t in settings.taus if t < tolerance[i]]
            if lower:
                tolerance[i] = max(lower)
            else:
                del todo[i]
        log(f"refinement: {len(kept)} sets replaced, {len(todo)} tried again at a smaller tolerance")
    seconds = time.perf_counter() - t0 - judging          # searches only, as in `descending`
    before = {i: sets[(i, tau)] for i, tau in tau_of.items()}
    stats = {"n_refined": len(tried), "n_refined_kept": len(kept), "n_attempts": sum(tried.values()),
             "refine_evaluations": n_eval - trace.n_evaluations,
             "refine_forward_items": n_items - trace.n_forward_items, "seconds_refining": seconds,
             "seconds_refine_checks": judging,
             "sizes_before": [len(before[i]) for i in sorted(before)],
             "sizes_after": [len(kept[i]) if i in kept else len(before[i]) for i in sorted(before)],
             "tolerances": [tolerance[i] if i in kept else None for i in sorted(before)]}
    if not tried:
        return trace, sets, frame, stats
    take = [prompts[i].prompt_id for i in kept]
    sets = {**sets, **{(i, tau_of[i]): fs for i, fs in kept.items()}}
    selected = (pl.col("kind") == "set") & pl.col("selected") & pl.col("prompt_id").is_in(take)
    ok = pl.col("jailbroken")
    frame = pl.concat([
        frame.with_columns(pl.when(selected).then(pl.lit("unrefined")).otherwise("kind").alias("kind"),
                           (pl.col("selected") & ~selected).alias("selected")),
        *(part.with_columns(pl.when(ok).then(pl.lit("set")).otherwise(pl.lit("refined")).alias("kind"),
                            ok.alias("selected")).select(frame.columns) for part in checked)])
    return (PruneTrace(pl.concat(steps), trace.kept, n_steps, n_eval, n_items, trace.seconds + seconds),
            sets, frame, stats)
