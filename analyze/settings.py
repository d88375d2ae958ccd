"""Settings shared by every stage that generates completions and judges them."""

from __future__ import annotations

from dataclasses import dataclass

from analyze.judges import JUDGE_NAMES
from store import UsageError
from store.settings import Settings


def check_judge(name: str | None) -> None:
    """A judge name is one of JUDGE_NAMES, optionally with a threshold (`p_i@0.3`); None passes."""
    if name is not None and name.partition("@")[0] not in JUDGE_NAMES:
        raise UsageError(f"unknown judge {name!r}; use one of {', '.join(JUDGE_NAMES)}")


@dataclass(frozen=True)
class JudgedSettings(Settings):
    # analyze/judges.py: rubric, content, phrase, p_i[@T], harmbench, llamaguard. rubric is the default because it
    # agrees best with labelled completions: kappa 0.70 vs content 0.50 on the gold test part (cli.py judge eval)
    judge: str = "rubric"
    generate: int = 64                    # greedy completion tokens for judges that read completions
    # rows per forward pass. On a CPU a greedy decode step costs about the same for 16 rows as for 64 (the
    # weights are read once per step either way; the prefill is compute-bound at any size), so generation runs
    # go 1.59x faster at 64 than at 16, completions identical (bench/bench_generate.py, README benchmarks)
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_judge(self.judge)
        if self.generate is not None and self.generate < 0:
            raise UsageError(f"generate must be >= 0, got {self.generate}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class JudgedPromptSettings(JudgedSettings):
    """A judged stage over a store's prompts (stage-2 sets, feature sets) that can take the first N."""

    max_prompts: int | None = None        # at most this many prompts, the first by prompt id (None: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UsageError(f"max_prompts must be >= 1 (or null: all), got {self.max_prompts}")
