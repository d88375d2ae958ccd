"""Stage 3's linear baseline: logistic regression on the FM's sparse data, latents ranked by |weight|.

The inverse regularization strength C is chosen on the validation split from `Cs` (the FM gets its
best validation epoch; the baseline gets the same courtesy), then the probe is refitted on train
at that C. Input is the scipy CSR view of the data; nothing is densified.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from analyze.stage3.data import SPLITS, FmData
from store import UsageError
from store.settings import Settings


@dataclass(frozen=True)
class ProbeSettings(Settings):
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)   # inverse L2 strengths tried on val
    max_iter: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.Cs or any(not c > 0 for c in self.Cs):
            raise UsageError(f"probe Cs must be a non-empty list of values > 0, got {self.Cs}")
        if self.max_iter < 1:
            raise UsageError(f"probe max_iter must be >= 1, got {self.max_iter}")



@dataclass(frozen=True, eq=False)
class ProbeFit:
    coef: np.ndarray                      # [n_features] weight per column
    intercept: float
    C: float                              # the chosen inverse regularization strength
    accuracy: dict[str, float]            # split -> accuracy
    val_acc_by_C: dict[float, float]

    def ranking(self, exclude: np.ndarray | None = None) -> np.ndarray:
        """Column ids by |weight|, largest first; ties by column id; `exclude` columns left out."""
        order = np.lexsort((np.arange(len(self.coef)), -np.abs(self.coef)))
        return order if exclude is None else order[~np.isin(order, exclude)]


def fit(data: FmData, settings: ProbeSettings = ProbeSettings()) -> ProbeFit:
    """Logistic regression on train, C picked by validation accuracy (the smallest C among ties)."""
    _check(data)
    X = data.to_scipy()                                                   # [n_rows, n_features] CSR
    y = data.label.astype(np.int64)
    masks = {s: data.split == s for s in SPLITS}
    val_acc = {}
    fitted = {}
    for C in sorted(settings.Cs):
        clf = _fit_one(X[masks["train"]], y[masks["train"]], C, settings)
        val_acc[C] = float(clf.score(X[masks["val"]], y[masks["val"]]))
        fitted[C] = clf
    best = max(sorted(settings.Cs), key=lambda c: (val_acc[c], -c))
    clf = fitted[best]
    accuracy = {s: float(clf.score(X[m], y[m])) for s, m in masks.items()}
    return ProbeFit(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), best, accuracy, val_acc)


def _fit_one(X, y, C: float, settings: ProbeSettings) -> LogisticRegression:
    clf = LogisticRegression(C=C, max_iter=settings.max_iter, random_state=settings.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # large C on separable data: lbfgs never "converges"
        return clf.fit(X, y)


def _check(data: FmData) -> None:
    for s in SPLITS:
        if not (data.split == s).any():
            raise UsageError(f"the probe's data set has no {s} prompts; it needs train, val and test rows")
    if set(np.unique(data.label[data.split == "train"]).tolist()) != {0, 1}:
        raise UsageError("the probe needs both harmful (1) and benign (0) training prompts, and no other labels")
