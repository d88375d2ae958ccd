"""The bisection's two bases (analyze/bisect.py) on a P("I") curve given in closed form: no model, so the
evaluations each base makes and the set each returns can be worked out by hand."""

from types import SimpleNamespace

import numpy as np
import pytest

from analyze.bisect import bisect_prune
from analyze.prune import _STEP_SCHEMA

POOL = [(10, f) for f in range(8)]
SCORES = {f: -1.0 + 0.1 * i for i, f in enumerate(POOL)}     # POOL is already in attribution order
P_FULL = 0.01


def _measure(curve):
    """P(S) = curve(k) for the prefix S of length k; any other set is a test error."""
    calls = []

    def measure(rows, tests):
        for t in tests:
            assert t == POOL[:len(t)], "the bisection ablates prefixes of the attribution order only"
        calls.append(len(tests))
        return SimpleNamespace(p_i=np.array([curve(len(t)) for t in tests]), items=np.arange(len(tests)),
                               n_forward_items=len(tests), run_id="r", run_of=lambda k: "r")
    return measure, calls


def _search(curve, base, tau=0.3):
    measure, calls = _measure(curve)
    steps, kept, n_steps, n_eval, _, _ = bisect_prune([set(POOL)], np.array([P_FULL]), (tau,), (0,), [SCORES],
                                                      measure, ["p0"], _STEP_SCHEMA, base=base)
    return steps, kept[(0, tau, 0)], n_eval


def _drifting(k):
    # the first two latents hold refusal; restoring any later one raises P("I") by 10% of its value
    return 0.5 if k < 2 else P_FULL * 1.1 ** (8 - k)


def test_pool_base_keeps_the_prefix_within_tau_of_the_whole_pool():
    # k = 4: 1.1^4 = 1.46 fails; k = 6: 1.21 passes; k = 5: 1.33 fails -> S_6
    steps, kept, n_eval = _search(_drifting, "pool")
    assert kept == frozenset(POOL[:6]) and n_eval == 3
    assert steps["p_base"].to_list() == pytest.approx([P_FULL] * 3)
    assert steps["decision"].to_list() == ["keep", "prune", "keep"]


def test_last_pass_base_drifts_like_algorithm_1_and_keeps_less():
    # k = 4 against P(C): fails; k = 6 against P(C): passes, base -> P(S_6) = 0.0121;
    # k = 5 against P(S_6): 1.1 - 1 = 0.1 < 0.3 passes -> S_5, one latent fewer, same evaluations
    steps, kept, n_eval = _search(_drifting, "last_pass")
    assert kept == frozenset(POOL[:5]) and n_eval == 3
    assert steps["p_base"].to_list() == pytest.approx([P_FULL, P_FULL, P_FULL * 1.1 ** 2])
    assert steps["decision"].to_list() == ["keep", "prune", "prune"]


def test_both_bases_agree_where_restoring_the_tail_changes_nothing():
    def step(k):
        return 0.5 if k < 2 else P_FULL
    for base in ("pool", "last_pass"):
        _, kept, n_eval = _search(step, base)
        assert kept == frozenset(POOL[:2]) and n_eval == 3


def test_an_unknown_base_is_refused():
    with pytest.raises(ValueError, match="bisect base must be one of pool, last_pass"):
        _search(_drifting, "median")
