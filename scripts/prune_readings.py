"""Both readings of Algorithm 1 (analyze/prune.py) on the planted test model: set sizes, ASR, evaluations.

Builds the planted tiny Qwen-2 (tests/planted.py) in a temporary directory, runs stages 1 and 2 offline
(judge p_i, the paper's N = 5, 8 taus, seeds 0, 1, 2) and prints one line per reading and per tau:
`python scripts/prune_readings.py` (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze import candidates, direction, prune  # noqa: E402
from analyze.metrics import rate_text  # noqa: E402
from analyze.prune import PruneSettings  # noqa: E402
from extract.models import load_model  # noqa: E402
from store import Store  # noqa: E402
from tests.planted import build_planted, candidate_settings, direction_settings  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="prune_readings_") as tmp:
        os.environ["REFUSALSCOPE_CACHE"] = str(Path(tmp) / "cache")
        planted = build_planted(Path(tmp) / "planted")
        model = load_model(str(planted.model_dir))
        store = Store.create(Path(tmp) / "store")
        direction.run(store, model, direction_settings(planted))
        candidates.run(store, model, candidate_settings(planted))
        planted_set = {(planted.layer, f) for f in planted.features}
        for variant in ("prose", "literal"):
            r = prune.run(store, model, PruneSettings(judge="p_i", variant=variant))
            m = r.summary
            print(f"{variant:<8} selected sets: {m['n_jailbroken']}/{m['n_prompts']} jailbroken "
                  f"({rate_text(m['n_jailbroken'], m['n_prompts'])}), {m['features_per_prompt']} features per "
                  f"prompt, {m['n_unique_features']} unique (planted {len(planted_set)}); "
                  f"{m['n_evaluations']} evaluations, {m['n_forward_items']} forward rows, {m['seconds_pruning']:.1f} s")
            sets = store.sql("SELECT prompt_id, tau, layer, feature FROM feature_sets WHERE set_id = ? AND stage = 2",
                             [r.prune_id])
            for row in r.per_tau.iter_rows(named=True):
                at = sets.filter(sets["tau"] == row["tau"])
                n_planted = sum((layer, f) in planted_set for _, _, layer, f in at.iter_rows())
                print(f"  tau {row['tau']:.1f}: {row['n_jailbroken']}/{row['n_prompts']} jailbroken, "
                      f"{row['mean_features']:.2f} features per prompt, {n_planted / row['n_prompts']:.2f} of them planted")


if __name__ == "__main__":
    main()
