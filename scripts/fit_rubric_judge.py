"""Fit the rubric judge's weights on the gold `train` split and write data/judge/rubric.json.

Only `train` is read for fitting; `test` is for measuring (analyze.judge_eval). The fit is
deterministic (lbfgs), so rerunning on the same gold file writes the same file:
`python scripts/fit_rubric_judge.py [GOLD.jsonl]`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze.judge_eval import load_gold
from analyze.rubric import PARAMS_PATH, fit_rubric

GOLD = Path(__file__).resolve().parents[1] / "data" / "judge_gold" / "gold_shared.jsonl"


def main(gold_path: Path) -> None:
    train = [x for x in load_gold(gold_path) if x.split == "train"]
    params = fit_rubric([x.prompt for x in train], [x.completion for x in train], [x.label for x in train])
    params["fitted_on"] = f"{gold_path.name} split=train"
    PARAMS_PATH.write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {PARAMS_PATH} ({len(train)} train items)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLD)
