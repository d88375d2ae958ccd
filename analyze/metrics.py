"""Agreement metrics with 95% intervals: Wilson intervals for rates, Cohen's kappa with a bootstrap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054                   # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) for k successes in n trials; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """k of n, with its Wilson 95% interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def low(self) -> float:
        return wilson(self.k, self.n)[0]

    @property
    def high(self) -> float:
        return wilson(self.k, self.n)[1]

    def text(self) -> str:
        return rate_text(self.k, self.n)


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its 95% interval."""

    value: float
    low: float
    high: float


def rate_text(k: int, n: int) -> str:
    """'62% [31%, 86%] (5/8)': the rate, its Wilson 95% interval and the counts."""
    if n == 0:
        return "n/a (0/0)"
    low, high = wilson(k, n)
    return f"{100 * k / n:.0f}% [{100 * low:.0f}%, {100 * high:.0f}%] ({k}/{n})"


def accuracy_text(accuracy: float, n: int) -> str:
    """'0.944 [0.742, 0.990]': an accuracy over n independent items with its Wilson 95% interval."""
    low, high = wilson(round(accuracy * n), n)
    return f"{accuracy:.3f} [{low:.3f}, {high:.3f}]"


def _check(truth: Sequence[str], pred: Sequence[str]) -> None:
    assert len(truth) == len(pred), (len(truth), len(pred))


def accuracy(truth: Sequence[str], pred: Sequence[str]) -> Rate:
    """Share of items where pred equals truth."""
    _check(truth, pred)
    return Rate(sum(t == p for t, p in zip(truth, pred)), len(truth))


def precision(truth: Sequence[str], pred: Sequence[str], label: str) -> Rate:
    """Of the items predicted `label`, the share that truly are."""
    _check(truth, pred)
    return Rate(sum(t == p == label for t, p in zip(truth, pred)), sum(p == label for p in pred))


def recall(truth: Sequence[str], pred: Sequence[str], label: str) -> Rate:
    """Of the items truly `label`, the share predicted so."""
    _check(truth, pred)
    return Rate(sum(t == p == label for t, p in zip(truth, pred)), sum(t == label for t in truth))


def _kappa_from_codes(t: np.ndarray, p: np.ndarray, n_labels: int) -> np.ndarray:
    """Cohen's kappa of each row of t against the same row of p (codes in [0, n_labels))."""
    n = t.shape[-1]
    observed = (t == p).mean(axis=-1)
    t_share = np.stack([(t == c).mean(axis=-1) for c in range(n_labels)], axis=-1)   # [..., n_labels]
    p_share = np.stack([(p == c).mean(axis=-1) for c in range(n_labels)], axis=-1)
    expected = (t_share * p_share).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = (observed - expected) / (1 - expected)
    # one label on both sides: kappa is undefined (0/0); agreement is then perfect, so call it 1
    return np.where(np.isclose(expected, 1.0), 1.0, kappa) if n else np.full_like(observed, math.nan)


def _codes(truth: Sequence[str], pred: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    labels = sorted(set(truth) | set(pred))
    index = {label: i for i, label in enumerate(labels)}
    return (np.array([index[x] for x in truth]), np.array([index[x] for x in pred]), len(labels))


def cohen_kappa(truth: Sequence[str], pred: Sequence[str]) -> float:
    """Cohen's kappa over all labels that occur: (p_o - p_e) / (1 - p_e)."""
    _check(truth, pred)
    t, p, n_labels = _codes(truth, pred)
    return float(_kappa_from_codes(t, p, n_labels))


def kappa_ci(truth: Sequence[str], pred: Sequence[str], n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Cohen's kappa with a seeded percentile-bootstrap 95% interval (items resampled)."""
    _check(truth, pred)
    if not truth:
        return Estimate(math.nan, math.nan, math.nan)
    t, p, n_labels = _codes(truth, pred)
    rows = np.random.default_rng(seed).integers(0, len(t), size=(n_boot, len(t)))   # [n_boot, n]
    boot = _kappa_from_codes(t[rows], p[rows], n_labels)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return Estimate(float(_kappa_from_codes(t, p, n_labels)), float(low), float(high))


def kappa_difference(truth: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str],
                     n_boot: int = 2000, seed: int = 0) -> Estimate:
    """kappa(a) - kappa(b) on the same items, with a paired percentile-bootstrap 95% interval."""
    _check(truth, pred_a)
    _check(truth, pred_b)
    labels = sorted(set(truth) | set(pred_a) | set(pred_b))
    index = {label: i for i, label in enumerate(labels)}
    t, a, b = (np.array([index[x] for x in seq]) for seq in (truth, pred_a, pred_b))
    rows = np.random.default_rng(seed).integers(0, len(t), size=(n_boot, len(t)))   # [n_boot, n]
    boot = _kappa_from_codes(t[rows], a[rows], len(labels)) - _kappa_from_codes(t[rows], b[rows], len(labels))
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    value = _kappa_from_codes(t, a, len(labels)) - _kappa_from_codes(t, b, len(labels))
    return Estimate(float(value), float(low), float(high))


# ---- paired comparisons of two conditions on the same items -------------------------------------

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only A) and c (only B); 1 when b + c = 0.

    Under H0 the b + c discordant pairs split Binomial(b + c, 1/2): p = min(1, 2 P(X <= min(b, c)))."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float, float]:
    """(p_A - p_B, low, high): Newcombe's (1998, method 10) interval for paired rates, from Wilson intervals.

    a = both succeed, b = only A, c = only B, d = neither."""
    n = a + b + c + d
    if n == 0:
        return math.nan, -1.0, 1.0
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    # Newcombe's correction: phi is shrunk toward 0 by n/2 when a*d > b*c
    num = max(a * d - b * c - n / 2, 0) if a * d > b * c else a * d - b * c
    phi = num / math.sqrt(denom) if denom else 0.0
    delta = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    epsilon = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    diff = p1 - p2
    return diff, max(-1.0, diff - delta), min(1.0, diff + epsilon)


@dataclass(frozen=True)
class Paired:
    """Two conditions judged on the same items: the 2x2 table, McNemar's exact p and the paired difference."""

    n_both: int                          # a: both succeed
    n_a_only: int                        # b
    n_b_only: int                        # c
    n_neither: int                       # d

    @classmethod
    def of(cls, a: Sequence[bool], b: Sequence[bool]) -> "Paired":
        """The table of two flag sequences over the same items (item i of a pairs with item i of b)."""
        x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
        assert x.shape == y.shape, (x.shape, y.shape)
        return cls(int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum()), int((~x & ~y).sum()))

    @property
    def n(self) -> int:
        return self.n_both + self.n_a_only + self.n_b_only + self.n_neither

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.n_a_only, self.n_b_only)

    @property
    def difference(self) -> Estimate:
        return Estimate(*paired_difference(self.n_both, self.n_a_only, self.n_b_only, self.n_neither))

    def as_dict(self) -> dict[str, float | int]:
        """The table, p-value and difference as plain numbers (for metrics JSON and `paired_tests` rows)."""
        diff = self.difference
        return {"n_pairs": self.n, "n_both": self.n_both, "n_a_only": self.n_a_only, "n_b_only": self.n_b_only,
                "n_neither": self.n_neither, "p_value": self.p_value, "diff": diff.value, "diff_low": diff.low,
                "diff_high": diff.high}

    def text(self) -> str:
        """'+25 pp [-3, +50], McNemar p = 0.07 (4 vs 1 discordant of 8)'."""
        diff = self.difference
        if self.n == 0:
            return "no paired items"
        return (f"{100 * diff.value:+.0f} pp [{100 * diff.low:+.0f}, {100 * diff.high:+.0f}], McNemar p = "
                f"{p_text(self.p_value)} ({self.n_a_only} vs {self.n_b_only} discordant of {self.n})")


def p_text(p: float) -> str:
    """A p-value in two significant digits ('0.07', '0.0039', '1')."""
    return "1" if p >= 0.995 else f"{p:.2g}"


def rate_ci(k: int, n: int) -> dict[str, float | None]:
    """{'ci_low', 'ci_high'}: the Wilson 95% interval of k/n, stored beside a rate (None when n = 0)."""
    if n == 0:
        return {"ci_low": None, "ci_high": None}
    low, high = wilson(k, n)
    return {"ci_low": low, "ci_high": high}


def bootstrap_paired_mean_diff(values: np.ndarray, weights: np.ndarray, baseline: np.ndarray,
                               baseline_weights: np.ndarray, n_boot: int = 2000,
                               seed: int = 0) -> Estimate:
    """Weighted mean of `values` minus that of `baseline`, with a paired percentile-bootstrap 95% interval.

    values, weights: [n_conditions, n_items] (the difference is averaged over conditions: e.g. feature sets);
    baseline, baseline_weights: [n_items]. Items (columns) are resampled together across all rows, so the
    pairing by item is kept. Weights are token counts: the means are token-weighted, as the CE columns are."""
    values, weights = np.atleast_2d(values), np.atleast_2d(weights)
    n = baseline.shape[0]
    assert values.shape[1] == weights.shape[1] == baseline_weights.shape[0] == n, (values.shape, n)

    def diff(cols: np.ndarray) -> np.ndarray:                                       # cols [n_boot, n]
        cond = (values[:, cols] * weights[:, cols]).sum(-1) / weights[:, cols].sum(-1)   # [n_cond, n_boot]
        base = (baseline[cols] * baseline_weights[cols]).sum(-1) / baseline_weights[cols].sum(-1)   # [n_boot]
        return (cond - base).mean(0)
    value = float(diff(np.arange(n)[None, :])[0])
    cols = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))             # [n_boot, n]
    low, high = np.nanpercentile(diff(cols), [2.5, 97.5])
    return Estimate(value, float(low), float(high))
