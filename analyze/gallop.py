"""Beyond the paper: stage 2 as Algorithm 1 with growing blocks in attribution order (`analyze prune --order gallop`).

Algorithm 1 (prose reading, analyze/prune.py) tests blocks of N in a random order: restore the block,
prune it when P("I") moves by less than tau of the current base, keep it (ablated) otherwise. Most
blocks of a stage-1 pool are pruned, one forward each. Here the pool is sorted by attribution score,
most negative first (analyze/bisect.py), and tested from the other end, the latents predicted to
matter least first, in chunks that grow while they pass:

    U <- the pool in attribution order; K <- {}; c <- N; base <- P(C)
    while U: chunk <- the last min(c, |U|) of U; p <- P(U \\ chunk  u  K)
        |base - p| / base < tau:  U <- U \\ chunk; base <- p; c <- 2c      (prune the whole chunk)
        else, |chunk| > N:        c <- max(N, c // 2)                       (retry a smaller chunk)
        else:                     K <- K u chunk; U <- U \\ chunk; c <- N   (keep it: a block of N)
    return K

A chunk that passes is pruned exactly as Algorithm 1 prunes a block, against the same drifting base, so
a kept block is one whose restoration alone moves P("I") by tau or more, as there. What changes is the
order (attribution instead of a seed's permutation: no seed, so the set is each seed's set) and that
runs of latents that do not matter are pruned in one forward instead of one per block: on a pool of
|C| with b kept blocks the search costs about b (1 + log2(|C| / (b N))) + log2 |C| evaluations instead
of |C| / N per seed. All searches advance in lockstep, one `measure` call per step, identical
(prompt, set) rows sharing one forward as in Algorithm 1.

`pruning_steps` rows: the block is the chunk tested (restored), p_base the base, p_without P with the
chunk restored, decision "prune" (passed) or "keep" (a block of N or fewer kept), "retry" (a larger
chunk failed and is tried again smaller), n_ablated the features ablated in the test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from analyze.bisect import Scores, attribution_order
from analyze.common import Feature, Log, no_log


@dataclass
class _Search:
    prompt: int
    tau: float
    untested: list[Feature]              # U: a prefix of the attribution order
    base: float                          # P("I") with U and K ablated
    chunk: int                           # c
    kept: list[Feature] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return bool(self.untested)

    def test(self) -> tuple[list[Feature], list[Feature]]:
        """(the chunk to restore, the set ablated while it is restored)."""
        n = min(self.chunk, len(self.untested))
        return self.untested[-n:], self.untested[:-n] + self.kept


def gallop_prune(pools: list[set[Feature]], p_full: np.ndarray, taus: tuple[float, ...], seeds: tuple[int, ...],
                 scores: list[Scores], block_size: int, measure, prompt_ids: list[str],
                 step_schema: dict[str, Any], log: Log = no_log, drift: bool = True):
    """Per (prompt, tau) the kept blocks, in lockstep; returns (steps frame, kept, n_steps, n_eval, n_items, s).

    `drift` False: the base stays P(pool) after a prune (delta against the pool's P("I") throughout, so the
    pruned latents together move P("I") by less than tau; analyze/descend.py's refinement)."""
    t0 = time.perf_counter()
    searches = [_Search(i, tau, attribution_order(pool, scores[i]), float(p_full[i]), block_size)
                for i, pool in enumerate(pools) for tau in taus]
    rows: list[dict[str, Any]] = []
    n_eval = n_items = step = 0
    while live := [s for s in searches if s.live]:
        tests = [s.test() for s in live]
        done = measure([s.prompt for s in live], [sorted(ablated) for _, ablated in tests])
        n_eval, n_items = n_eval + len(live), n_items + done.n_forward_items
        for k, (s, (chunk, ablated), p, item) in enumerate(zip(live, tests, done.p_i, done.items)):
            p_base, p = s.base, float(p)
            delta = abs(p_base - p) / p_base
            if delta < s.tau:
                decision = "prune"
                s.untested, s.base, s.chunk = s.untested[:-len(chunk)], p if drift else p_base, 2 * s.chunk
            elif len(chunk) > block_size:
                decision = "retry"
                s.chunk = max(block_size, s.chunk // 2)
            else:
                decision = "keep"
                s.kept, s.untested, s.chunk = s.kept + chunk, s.untested[:-len(chunk)], block_size
            rows.append({"prompt_id": prompt_ids[s.prompt], "tau": s.tau, "seed": seeds[0], "step": step,
                         "block_layers": [f[0] for f in chunk], "block_features": [f[1] for f in chunk],
                         "p_base": p_base, "p_without": p, "delta": delta, "decision": decision,
                         "n_ablated": len(ablated), "run_id": done.run_of(k), "item": int(item)})
        step += 1
        log(f"gallop step {step}: {len(live)} searches, {done.n_forward_items} forwards")
    kept = {(s.prompt, s.tau, seed): frozenset(s.kept) for s in searches for seed in seeds}
    return pl.DataFrame(rows, schema=step_schema), kept, step, n_eval, n_items, time.perf_counter() - t0
