"""Beyond the paper: stage 2 as a bisection over the attribution-sorted pool (`analyze prune --order bisect`).

The pool C (the stage-1 set) is sorted by attribution score, the predicted delta log P("I") of
ablating each latent alone (analyze/attribution.py), most negative first: the latents predicted to
hold refusal up come first. S_k is the first k of that order. For each tau the search looks for the
smallest k whose ablation alone keeps P("I") as low as ablating the whole pool, in Algorithm 1's
terms: restoring the rest, C \\ S_k, changes P("I") by less than tau,

    delta(k) = |P(C) - P(S_k)| / P(C) < tau        (P(X): P("I") with X zero-ablated)

Bisection on k assumes delta falls with k (it does when the order is right; where it does not, the
search still returns a prefix that passed the test). It starts from k = |C| (delta 0, passes) and
k = 0 (taken to fail: nothing ablated), and measures P(S_mid) at every step, so a (prompt, tau)
costs ceil(log2 |C|) evaluations where Algorithm 1 costs |C| / N per seed. All searches advance in
lockstep, one `measure` call per step (Algorithm 1's `Measure`, analyze/prune.py), and identical
(prompt, prefix) rows, common because every tau starts at the same midpoint, share one forward.
The order has no seed: the set found is each seed's set, so the intersection over seeds is that set.

Two bases (`bisect_base`):
- "pool" (the default, and what this module always did): delta(k) is taken against P(C) itself, the
  whole pool ablated. That is stricter than Algorithm 1, whose base value drifts up with every rejected
  block (each prune may raise P("I") by up to tau of the current value), so its sets can be far smaller.
- "last_pass": delta is taken against the last prefix that passed, as Algorithm 1 takes it against the
  last value measured after a prune: |P(S_hi) - P(S_mid)| / P(S_hi) < tau. A pass then prunes the
  chunk S_hi \\ S_mid exactly as Algorithm 1 prunes a block, and the base drifts the same way (by at
  most a factor (1 + tau) per pass, of which a search makes at most ceil(log2 |C|)).
  Same number of evaluations; beyond the paper, measured beside "pool" in the README.

`pruning_steps` rows of a search: the block is the prefix S_mid that was ablated, p_base = the base
(P(C), or P(S_hi) under "last_pass"), p_without = P(S_mid), decision "keep" when the prefix failed (the
search moves right: every latent in it is kept) and "prune" when it passed (the latents after it are
dropped), n_ablated = mid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from analyze.common import Feature, Log, no_log

Scores = dict[Feature, float]


@dataclass
class _Search:
    prompt: int
    tau: float
    order: list[Feature]                 # the pool, most negative score first
    lo: int = 0                          # a prefix length that fails (0: nothing ablated)
    hi: int = 0                          # a prefix length that passes (|C| at the start)
    p_hi: float = 0.0                    # P(S_hi): the base under "last_pass" (P(C) at the start)

    @property
    def live(self) -> bool:
        return self.hi - self.lo > 1

    @property
    def mid(self) -> int:
        return (self.lo + self.hi) // 2


def attribution_order(pool: set[Feature], scores: Scores) -> list[Feature]:
    """The pool by attribution score, most negative first (unscored latents count as 0); ties by feature."""
    return sorted(pool, key=lambda f: (scores.get(f, 0.0), f))


BASES = ("pool", "last_pass")


def bisect_prune(pools: list[set[Feature]], p_full: np.ndarray, taus: tuple[float, ...], seeds: tuple[int, ...],
                 scores: list[Scores], measure, prompt_ids: list[str], step_schema: dict[str, Any],
                 log: Log = no_log, base: str = "pool"):
    """Per (prompt, tau) the bisection's set, in lockstep; returns (steps frame, kept, n_steps, n_eval, n_items, s).

    `base`: what delta is taken against, P(C) ("pool") or P of the last passing prefix ("last_pass")."""
    if base not in BASES:
        raise ValueError(f"bisect base must be one of {', '.join(BASES)}, got {base!r}")
    t0 = time.perf_counter()
    searches = [_Search(i, tau, attribution_order(pool, scores[i]), 0, len(pool), float(p_full[i]))
                for i, pool in enumerate(pools) for tau in taus]
    rows: list[dict[str, Any]] = []
    n_eval = n_items = step = 0
    while live := [s for s in searches if s.live]:
        tests = [s.order[:s.mid] for s in live]
        done = measure([s.prompt for s in live], tests)
        n_eval, n_items = n_eval + len(live), n_items + done.n_forward_items
        for k, (s, test, p, item) in enumerate(zip(live, tests, done.p_i, done.items)):
            p_base = float(p_full[s.prompt]) if base == "pool" else s.p_hi
            delta = abs(p_base - float(p)) / p_base
            passes = delta < s.tau
            rows.append({"prompt_id": prompt_ids[s.prompt], "tau": s.tau, "seed": seeds[0], "step": step,
                         "block_layers": [f[0] for f in test], "block_features": [f[1] for f in test],
                         "p_base": p_base, "p_without": float(p), "delta": delta,
                         "decision": "prune" if passes else "keep", "n_ablated": len(test),
                         "run_id": done.run_of(k), "item": int(item)})
            if passes:
                s.hi, s.p_hi = s.mid, float(p)
            else:
                s.lo = s.mid
        step += 1
        log(f"bisection step {step}: {len(live)} searches, {done.n_forward_items} forwards")
    kept = {(s.prompt, s.tau, seed): frozenset(s.order[:s.hi]) for s in searches for seed in seeds}
    return pl.DataFrame(rows, schema=step_schema), kept, step, n_eval, n_items, time.perf_counter() - t0
