"""Paired statistics (analyze/metrics.py): McNemar's exact test, Newcombe's paired interval, the paired bootstrap."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from analyze.metrics import (Paired, bootstrap_paired_mean_diff, mcnemar_exact, paired_difference, rate_ci,
                             wilson)


def test_mcnemar_on_a_hand_computed_table():
    # 8 prompts: A jailbreaks 5 (4 of them alone), B 2 (1 alone) -> discordant b = 4, c = 1
    a = [True, True, True, True, True, False, False, False]
    b = [True, False, False, False, False, True, False, False]
    table = Paired.of(a, b)
    assert (table.n_both, table.n_a_only, table.n_b_only, table.n_neither) == (1, 4, 1, 2)
    # P(X <= 1 | X ~ Bin(5, 1/2)) = (1 + 5) / 32; two-sided: 12 / 32
    assert table.p_value == pytest.approx(12 / 32)
    assert mcnemar_exact(1, 7) == pytest.approx(2 * (1 + 8) / 256)        # 0.0703125
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_mcnemar_matches_a_two_sided_binomial_test():
    for b in range(0, 12):
        for c in range(0, 12):
            if b + c:
                assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, abs=1e-12), (b, c)


def test_paired_difference_interval():
    diff, low, high = paired_difference(1, 4, 1, 2)
    assert diff == pytest.approx(3 / 8) and low < diff < high and -1 <= low and high <= 1
    # swapping A and B mirrors the interval
    d2, l2, h2 = paired_difference(1, 1, 4, 2)
    assert (d2, l2, h2) == pytest.approx((-diff, -high, -low))
    # identical conditions: difference 0, an interval around it that shrinks with n
    small, large = paired_difference(3, 0, 0, 5), paired_difference(300, 0, 0, 500)
    assert small[0] == large[0] == 0 and small[2] - small[1] > large[2] - large[1] > 0
    # large n, no correlation: close to the Wald interval of a paired difference
    a, b, c, d = 2500, 2500, 1500, 3500
    n = a + b + c + d
    p_b, p_c = b / n, c / n
    half = 1.96 * math.sqrt((p_b + p_c - (p_b - p_c) ** 2) / n)
    diff, low, high = paired_difference(a, b, c, d)
    assert diff == pytest.approx(0.1) and (low, high) == pytest.approx((0.1 - half, 0.1 + half), abs=2e-3)
    # the text names both discordant counts and the p-value
    assert Paired(1, 4, 1, 2).text() == "+38 pp [-13, +69], McNemar p = 0.38 (4 vs 1 discordant of 8)"


def test_rate_ci_is_wilson():
    assert rate_ci(5, 8) == pytest.approx({"ci_low": wilson(5, 8)[0], "ci_high": wilson(5, 8)[1]})
    assert rate_ci(0, 0) == {"ci_low": None, "ci_high": None}


def test_paired_bootstrap_of_a_constant_shift_is_that_shift():
    rng = np.random.default_rng(1)
    base = rng.normal(2.0, 0.5, size=40)
    tokens = rng.integers(5, 30, size=40).astype(float)
    shifted = np.stack([base + 0.3, base + 0.1])                        # two conditions (feature sets)
    est = bootstrap_paired_mean_diff(shifted, np.stack([tokens, tokens]), base, tokens)
    # every resample keeps the pairing: the difference is exactly the mean shift, with no spread
    assert (est.value, est.low, est.high) == pytest.approx((0.2, 0.2, 0.2))
    # unpaired noise of the same size gives a wide interval around the true shift of 0.25
    noisy = base + 0.25 + rng.normal(0, 0.5, size=40)
    est = bootstrap_paired_mean_diff(noisy, tokens, base, tokens)
    weighted = float((noisy * tokens).sum() / tokens.sum() - (base * tokens).sum() / tokens.sum())
    assert est.value == pytest.approx(weighted) and est.low < est.value < est.high and est.high - est.low > 0.1
