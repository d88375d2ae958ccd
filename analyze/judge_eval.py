"""How far judges agree with gold labels (data/judge_gold/) and with each other.

ASR counts compliance only, so each judge's line also gives its precision and recall on the
`compliance` class and the ASR it would report next to the labelled one.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from analyze.judges import JUDGE_NAMES, VERDICTS, JudgeInput, get_judge
from analyze.metrics import Estimate, Rate, accuracy, cohen_kappa, kappa_ci, precision, recall
from store import UsageError

ASR_LABEL = "compliance"
_TEXT_FIELDS = ("prompt", "completion", "label")


@dataclass(frozen=True)
class GoldItem:
    prompt: str
    completion: str
    label: str                                  # one of VERDICTS
    split: str | None = None
    p_i: float | None = None
    id: str | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class JudgeScore:
    name: str
    judge_id: str
    n: int
    accuracy: Rate
    kappa: Estimate                             # bootstrap 95% interval, seed 0
    precision: Rate                             # of `compliance`
    recall: Rate
    judged_asr: Rate                            # share the judge calls compliance
    labelled_asr: Rate                          # share labelled compliance


@dataclass(frozen=True)
class JudgeEvalResult:
    split: str | None                           # None: every item
    n: int
    scores: tuple[JudgeScore, ...]
    skipped: tuple[tuple[str, str], ...]        # (judge name, why)


@dataclass(frozen=True)
class Agreement:
    judge_a: str
    judge_b: str
    kappa: float
    agree: Rate


@dataclass(frozen=True)
class AgreementTable:
    n: int
    compliance: tuple[tuple[str, Rate], ...]    # (judge, share of items it calls compliance)
    pairs: tuple[Agreement, ...]


def _item(raw: object, where: str) -> GoldItem:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a JSON object")
    for field in _TEXT_FIELDS:
        if not isinstance(raw.get(field), str):
            raise UsageError(f"{where}: field {field!r} missing or not a string")
    if raw["label"] not in VERDICTS:
        raise UsageError(f"{where}: unknown label {raw['label']!r}; use one of {', '.join(VERDICTS)}")
    p_i = raw.get("p_i")
    if p_i is not None and not (isinstance(p_i, (int, float)) and 0 <= p_i <= 1):
        raise UsageError(f"{where}: p_i must be a number in [0, 1], got {p_i!r}")
    return GoldItem(raw["prompt"], raw["completion"], raw["label"], raw.get("split"),
                    None if p_i is None else float(p_i), raw.get("id"), raw.get("dataset"))


def load_gold(path: str | Path) -> tuple[GoldItem, ...]:
    """Labelled items of a JSONL file with prompt, completion, label (optional split, p_i, id, dataset)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no gold file {path}; e.g. data/judge_gold/gold_shared.jsonl")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{number}: not JSON ({err.msg})") from None
        items.append(_item(raw, f"{path}:{number}"))
    if not items:
        raise UsageError(f"{path} has no labelled items")
    return tuple(items)


def _why_skipped(name: str, gold: Sequence[GoldItem]) -> str | None:
    """Why the judge called `name` cannot be measured on `gold` (None: it can)."""
    if name.partition("@")[0] not in JUDGE_NAMES:
        get_judge(name)                         # raises: unknown judge
    try:
        judge = get_judge(name)
    except UsageError as err:                   # a GPU judge on a CPU, weights absent
        return str(err)
    if not judge.needs_completion and any(x.p_i is None for x in gold):
        return "needs p_i, which the gold file lacks"
    return None


def score_verdicts(name: str, judge_id: str, labels: Sequence[str], verdicts: Sequence[str]) -> JudgeScore:
    """A judge's agreement with the labels of the same items."""
    return JudgeScore(
        name, judge_id, len(labels), accuracy(labels, verdicts), kappa_ci(labels, verdicts),
        precision(labels, verdicts, ASR_LABEL), recall(labels, verdicts, ASR_LABEL),
        Rate(sum(v == ASR_LABEL for v in verdicts), len(verdicts)),
        Rate(sum(t == ASR_LABEL for t in labels), len(labels)))


def evaluate_judges(gold: Sequence[GoldItem], judge_names: Sequence[str], split: str | None = None) -> JudgeEvalResult:
    """Each judge's accuracy, kappa and compliance precision/recall against the labels of `split`."""
    items = [x for x in gold if split is None or x.split == split]
    if not items:
        found = sorted({str(x.split) for x in gold})
        raise UsageError(f"no gold items in split {split!r}; the file has {', '.join(found)}")
    labels = [x.label for x in items]
    scores, skipped = [], []
    for name in judge_names:
        why = _why_skipped(name, items)
        if why is not None:
            skipped.append((name, why))
            continue
        judge = get_judge(name)
        inputs = [JudgeInput(x.prompt, x.completion, math.nan if x.p_i is None else x.p_i) for x in items]
        verdicts = [v.verdict for v in judge.judge(inputs)]
        scores.append(score_verdicts(name, judge.judge_id, labels, verdicts))
    return JudgeEvalResult(split, len(items), tuple(scores), tuple(skipped))


def summary_lines(result: JudgeEvalResult, default_judge: str) -> list[str]:
    """One line per judge ('*' after the default's name), then the skipped judges and the labelled ASR."""
    lines = []
    for s in result.scores:
        name = s.name + ("*" if s.name == default_judge else "")
        lines.append(f"{name}  accuracy {s.accuracy.value:.3f} [{s.accuracy.low:.3f}, {s.accuracy.high:.3f}]  "
                     f"kappa {s.kappa.value:.3f}  precision {s.precision.value:.3f}  "
                     f"recall {s.recall.value:.3f}  n {s.n}")
    lines += [f"{name}  skipped: {why}" for name, why in result.skipped]
    if result.scores:
        lines.append(f"labelled ASR {result.scores[0].labelled_asr.text()}; judged ASR "
                     + ", ".join(f"{s.name} {s.judged_asr.text()}" for s in result.scores))
    return lines


def agreement_table(verdicts_by_judge: Mapping[str, Sequence[str]]) -> AgreementTable:
    """Pairwise kappa and raw agreement between judges, and the share each calls compliance, on the same items."""
    lengths = {len(v) for v in verdicts_by_judge.values()}
    if len(lengths) > 1:
        raise UsageError(f"judges gave verdicts on different numbers of items: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    compliance = tuple((name, Rate(sum(v == ASR_LABEL for v in verdicts), n))
                       for name, verdicts in verdicts_by_judge.items())
    pairs = tuple(Agreement(a, b, cohen_kappa(verdicts_by_judge[a], verdicts_by_judge[b]),
                            accuracy(verdicts_by_judge[a], verdicts_by_judge[b]))
                  for a, b in itertools.combinations(verdicts_by_judge, 2))
    return AgreementTable(n, compliance, pairs)
