"""Both readings of Algorithm 1 (analyze/prune.py docstring): on a hand-built P("I"), and on the planted model."""

import numpy as np
import pytest

from analyze import prune
from analyze.common import Evaluated, analysis_id
from analyze.prune import PruneSettings
from store import UsageError
from tests.planted import PLANTED_FEATURES, PLANTED_LAYER

PLANTED = {(PLANTED_LAYER, f) for f in PLANTED_FEATURES}
A, B = (2, 1), (2, 2)                                      # redundant pair: refusal drops only with both ablated
POOL = {A, B, (2, 3), (2, 4), (2, 5), (2, 6)}


def redundant_pair(ablated: set) -> float:
    """P("I") is 0.1 when A and B are both ablated, else 0.9: the others never matter."""
    return 0.1 if {A, B} <= ablated else 0.9


def fake_measure(p_of, calls: list):
    """A `Measure` that reads P("I") off `p_of(ablated set)` and records each step's ablation sets."""
    def measure(rows, ablated):
        calls.append([set(a) for a in ablated])
        n = len(rows)
        return Evaluated("fake", np.arange(n), np.array([p_of(set(a)) for a in ablated]), [None] * n, n, False)
    return measure


def trace_of(pool, p_of, **kw):
    settings = PruneSettings(**kw)
    calls: list = []
    trace = prune.algorithm1([pool], np.array([p_of(pool)]), settings, fake_measure(p_of, calls), ["p0"])
    return trace, prune.minimal_sets(trace.kept, 1, settings), calls, settings


def order_of(trace, seed) -> list:
    run = trace.steps.filter(trace.steps["seed"] == seed).sort("step")
    return [pair for l, f in zip(run["block_layers"], run["block_features"]) for pair in zip(l, f)]


def test_readings_differ_on_a_redundant_pair_as_computed_by_hand():
    # prose: A and B stay ablated (untested or accepted) whenever one of them is tested, so restoring either
    # lifts P from 0.1 to 0.9 (delta 8): both kept, under any order; the others change nothing (delta 0).
    # literal: restoring the first of A, B tested (the other still untested, so ablated) lifts P: kept; from
    # then on that one is restored in every set, P is 0.9 throughout and every delta is 0: nothing else kept.
    seeds = (0, 1, 3)
    prose_trace, prose_sets, _, _ = trace_of(POOL, redundant_pair, block_size=1, taus=(0.5,), seeds=seeds)
    literal_trace, literal_sets, _, _ = trace_of(POOL, redundant_pair, block_size=1, taus=(0.5,), seeds=seeds,
                                                 variant="literal")
    firsts = {}
    for seed in seeds:
        order = order_of(literal_trace, seed)
        firsts[seed] = A if order.index(A) < order.index(B) else B
        assert order_of(prose_trace, seed) == order                        # same blocks, same order
        assert prose_trace.kept[(0, 0.5, seed)] == {A, B}
        assert literal_trace.kept[(0, 0.5, seed)] == {firsts[seed]}
    assert set(firsts.values()) == {A, B}                   # the seeds disagree, so the intersection matters
    assert prose_sets == {(0, 0.5): {A, B}}
    assert literal_sets == {(0, 0.5): frozenset()}           # {A} under some seeds, {B} under others
    assert prose_trace.n_evaluations == literal_trace.n_evaluations == 3 * len(POOL)


def test_literal_ablates_exactly_the_untested_blocks_and_prose_all_but_the_rejected():
    trace, _, calls, _ = trace_of(POOL, redundant_pair, block_size=2, taus=(0.5,), seeds=(0,), variant="literal")
    order = order_of(trace, 0)
    blocks = [set(order[s:s + 2]) for s in range(0, len(order), 2)]
    for step, (tested,) in enumerate(calls):                 # C\(K u V): the blocks after this one
        assert tested == set().union(*blocks[step + 1:])
    p_base = trace.steps.sort("step")["p_base"].to_list()
    p_without = trace.steps.sort("step")["p_without"].to_list()
    assert p_base[1:] == p_without[:-1]                     # the next base set is always this test set
    prose, _, calls, _ = trace_of(POOL, redundant_pair, block_size=2, taus=(0.5,), seeds=(0,))
    rejected: set = set()
    for (tested,), row in zip(calls, prose.steps.sort("step").iter_rows(named=True)):
        block = set(zip(row["block_layers"], row["block_features"]))
        assert tested == POOL - rejected - block             # C\V, C = the pool less the rejected blocks
        rejected |= block if row["decision"] == "prune" else set()


def additive(ablated: set) -> float:
    """Each ablated feature lowers P("I") by 0.15: with tau 0.1 every block matters in both readings."""
    return 1.0 - 0.15 * len(ablated)


@pytest.mark.parametrize("variant", ["prose", "literal"])
def test_last_block_smaller_than_n_is_tested_or_skipped(variant):
    pool = {(2, f) for f in range(5)}                        # N = 2: blocks of 2, 2 and 1
    tested, _, _, _ = trace_of(pool, additive, block_size=2, taus=(0.1,), seeds=(0,), variant=variant)
    assert tested.n_steps == 3 and tested.kept[(0, 0.1, 0)] == pool
    skipped, _, calls, _ = trace_of(pool, additive, block_size=2, taus=(0.1,), seeds=(0,), variant=variant,
                                    last_block="skip")
    order = order_of(skipped, 0)
    remainder = pool - set(order)
    assert skipped.n_steps == 2 and len(remainder) == 1
    assert all(remainder <= ablated for (ablated,) in calls)           # never tested: ablated throughout
    assert skipped.kept[(0, 0.1, 0)] == set(order)                     # and not in K


def test_settings_variant_and_last_block():
    assert "variant" not in PruneSettings().hashed() and "last_block" not in PruneSettings().hashed()
    prose = analysis_id("prune", "m", "c", PruneSettings())
    assert analysis_id("prune", "m", "c", PruneSettings(variant="prose", last_block="test")) == prose
    assert analysis_id("prune", "m", "c", PruneSettings(variant="literal")) != prose
    assert analysis_id("prune", "m", "c", PruneSettings(last_block="skip")) != prose
    s = PruneSettings.from_options(variant="literal", last_block="skip", taus="0.5")
    assert (s.variant, s.last_block, s.taus) == ("literal", "skip", (0.5,))
    for bad in ({"variant": "backward"}, {"last_block": "drop"}):
        with pytest.raises(UsageError):
            PruneSettings(**bad)


@pytest.fixture(scope="module")
def both(planted_stage1):
    """Stage 2 on the planted model (N = 5, 8 taus, seeds 0, 1, 2) under each reading."""
    store, model = planted_stage1
    return store, {v: prune.run(store, model, PruneSettings(judge="p_i", variant=v)) for v in ("prose", "literal")}


def test_both_readings_run_on_the_planted_model(both):
    store, results = both
    prose, literal = results["prose"], results["literal"]
    assert prose.prune_id != literal.prune_id
    steps = {v: store.sql("SELECT * FROM pruning_steps WHERE prune_id = ? ORDER BY prompt_id, tau, seed, step",
                          [r.prune_id]) for v, r in results.items()}
    for key, run in steps["literal"].group_by(["prompt_id", "tau", "seed"], maintain_order=True):
        assert run["p_base"].to_list()[1:] == run["p_without"].to_list()[:-1]
        assert run["n_ablated"][-1] == 0                    # every block tested, so none left ablated
        other = steps["prose"].filter((steps["prose"]["prompt_id"] == key[0]) & (steps["prose"]["tau"] == key[1])
                                      & (steps["prose"]["seed"] == key[2]))
        first_keep = run["decision"].to_list().index("keep")           # both agree up to the first acceptance
        assert run["p_without"][:first_keep + 1].to_list() == other["p_without"][:first_keep + 1].to_list()
    for r in results.values():                              # every (prompt, tau) set was judged
        assert r.per_tau["n_prompts"].to_list() == [4] * 8
