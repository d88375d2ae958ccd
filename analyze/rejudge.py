"""Re-judge a store's completions with another judge, with no model: completions are in the store.

Every run whose items carry completions (or the runs named) gets the new judge's verdicts in
`judgements`, beside the verdicts already there; the result is the agreement between the new judge
and each judge that judged the same items before: Cohen's kappa, raw agreement, and the share each
calls compliance (what ASR counts), with Wilson intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from analyze.judge_eval import AgreementTable, agreement_table
from analyze.judges import get_judge, judge_run
from analyze.settings import check_judge
from store import Store, UsageError
from store.settings import Settings

# items judged by two judges, one row per (run, item, judge pair)
PAIRS_SQL = """
SELECT a.run_id, a.item, a.judge AS judge_a, b.judge AS judge_b, a.verdict AS verdict_a, b.verdict AS verdict_b,
       p.text AS prompt, coalesce(a.completion, b.completion) AS completion
FROM judgements a
JOIN judgements b ON b.run_id = a.run_id AND b.item = a.item AND a.judge < b.judge
JOIN prompts p ON p.prompt_id = a.prompt_id
ORDER BY a.judge, b.judge, a.run_id, a.item
"""


@dataclass(frozen=True)
class RejudgeSettings(Settings):
    judge: str = "rubric"                 # the judge whose verdicts are added
    runs: tuple[str, ...] = ()            # run ids; () = every complete run whose items have completions

    def __post_init__(self) -> None:
        check_judge(self.judge)


@dataclass(frozen=True)
class RejudgeResult:
    judge: str                            # the new judge's id (name:hash)
    runs: tuple[str, ...]
    n_items: int
    agreement: tuple[AgreementTable, ...]  # one per judge that judged the same items before


def run(store: Store, settings: RejudgeSettings) -> RejudgeResult:
    """The new judge's verdicts on every chosen run, stored, and its agreement with the judges before it."""
    judge = get_judge(settings.judge)
    runs = settings.runs or tuple(store.sql(
        "SELECT DISTINCT r.run_id FROM runs r JOIN items i USING (run_id) WHERE r.status = 'complete' "
        "AND i.completion IS NOT NULL ORDER BY r.run_id")["run_id"])
    if not runs:
        raise UsageError(f"no run with completions in {store.path}; extract with --generate N first")
    n_items = sum(judge_run(store, run_id, judge).height for run_id in runs)
    pairs = pair_verdicts(store).filter(pl.col("run_id").is_in(list(runs)))
    tables = []
    for (a, b), rows in pairs.group_by("judge_a", "judge_b", maintain_order=True):
        if judge.judge_id in (a, b):
            tables.append(agreement_table({a: rows["verdict_a"].to_list(), b: rows["verdict_b"].to_list()}))
    return RejudgeResult(judge.judge_id, tuple(runs), n_items, tuple(tables))


def pair_verdicts(store: Store) -> pl.DataFrame:
    """Every item judged by two judges: both verdicts, the prompt and the completion."""
    return store.sql(PAIRS_SQL)


def summary_line(r: RejudgeResult) -> str:
    """One line: how many items were judged, by which judge."""
    return f"{r.judge} judged {r.n_items} items of {len(r.runs)} runs (no model loaded)"


def detail_lines(r: RejudgeResult) -> list[str]:
    """Per judge pair: kappa, raw agreement and each judge's compliance share on the same items."""
    lines = []
    for t in r.agreement:
        (name_a, rate_a), (name_b, rate_b) = t.compliance
        pair = t.pairs[0]
        lines.append(f"  {name_a} vs {name_b}  n {t.n}  kappa {pair.kappa:.3f}  agree {pair.agree.text()}  "
                     f"compliance {rate_a.text()} vs {rate_b.text()}")
    return lines or ["  no other judge judged these items"]
