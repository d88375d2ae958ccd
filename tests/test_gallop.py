"""Stage 2's galloping search (analyze/gallop.py) on P("I") given in closed form, traced by hand (the planted
model's test is in tests/test_attribution.py, beside its fixtures)."""

from types import SimpleNamespace

import numpy as np
import pytest

from analyze.gallop import gallop_prune
from analyze.prune import _STEP_SCHEMA

POOL = [(10, f) for f in range(20)]                          # already in attribution order
SCORES = {f: -1.0 + 0.01 * i for i, f in enumerate(POOL)}
P_FULL = 0.01
HEAD = set(POOL[:3])                                         # restoring any of these restores refusal


def _p(ablated: set, strong: tuple = ()) -> float:
    """0.5 unless HEAD is ablated; else 1.02x per other latent restored, and 1.5x per `strong` one restored."""
    if not HEAD <= ablated:
        return 0.5
    restored = set(POOL) - ablated
    return P_FULL * 1.02 ** len(restored) * 1.5 ** len(restored & set(strong))


def _search(strong=(), tau=0.3):
    calls = []

    def measure(rows, tests):
        calls.append([len(t) for t in tests])
        return SimpleNamespace(p_i=np.array([_p(set(t), strong) for t in tests]), items=np.arange(len(tests)),
                               n_forward_items=len(tests), run_id="r", run_of=lambda k: "r")
    steps, kept, n_steps, n_eval, _, _ = gallop_prune([set(POOL)], np.array([P_FULL]), (tau,), (0, 1), [SCORES], 5,
                                                      measure, ["p0"], _STEP_SCHEMA)
    assert kept[(0, tau, 0)] == kept[(0, tau, 1)]             # no seed: every seed's set is the search's set
    return steps, kept[(0, tau, 0)], n_eval


def test_chunks_double_while_they_pass_and_the_head_block_is_kept():
    # restore 15..19: 1.02^5 - 1 = 0.10 < 0.3, prune; restore 5..14 against the new base: 1.02^10 - 1 = 0.22,
    # prune; restore 0..4: refusal back, keep. 3 evaluations where Algorithm 1 makes 4 per seed
    steps, kept, n_eval = _search()
    assert kept == frozenset(POOL[:5]) and n_eval == 3
    assert steps["decision"].to_list() == ["prune", "prune", "keep"]
    assert [len(b) for b in steps["block_features"]] == [5, 10, 5]
    assert steps["p_base"].to_list() == pytest.approx([P_FULL, P_FULL * 1.02 ** 5, P_FULL * 1.02 ** 15])


def test_a_failing_chunk_is_retried_smaller_down_to_a_block_of_n():
    # latent 8 alone moves P("I") by 50%: the chunk 5..14 fails and is retried as 10..14 (passes); 0..9 fails,
    # 5..9 fails as a block of N and is kept, then 0..4 is kept: the blocks Algorithm 1 would keep
    steps, kept, n_eval = _search(strong=(POOL[8],))
    assert kept == frozenset(POOL[:10]) and n_eval == 6
    assert steps["decision"].to_list() == ["prune", "retry", "prune", "retry", "keep", "keep"]
    assert [len(b) for b in steps["block_features"]] == [5, 10, 5, 10, 5, 5]
    # the base moves only on a prune, as Algorithm 1's does
    assert steps["p_base"].to_list() == pytest.approx([P_FULL] + [P_FULL * 1.02 ** 5] * 2 + [P_FULL * 1.02 ** 10] * 3)


def test_every_search_is_one_row_per_step_in_lockstep():
    steps, _, n_eval = _search()
    assert steps.height == n_eval and steps["step"].to_list() == list(range(n_eval))

