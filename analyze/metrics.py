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
