"""Stage 3's ranking: per prompt with a stage-2 set, candidates by FM cosine (max over the set) or |probe weight|."""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from analyze.common import Feature
from analyze.stage3.data import FmData
from extract.datasets import Prompt
from store import UsageError

if TYPE_CHECKING:
    from analyze.stage3.stage import Stage3Settings

AGGREGATES = ("max", "mean")            # FM score over a prompt's stage-2 set: max or mean cosine


def rank_by_fm(V: torch.Tensor, seeds: np.ndarray, candidates: np.ndarray,
               aggregate: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Candidate columns by cosine of their FM embedding to the seed columns' (max or mean over seeds), best first.

    Returns (columns, scores); ties keep the lower column id first.
    """
    if aggregate not in AGGREGATES:
        raise UsageError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    u = F.normalize(V.detach().double(), dim=-1)                                   # [n_features, k]
    sim = u[torch.from_numpy(candidates)] @ u[torch.from_numpy(seeds)].T           # [n_candidates, n_seeds]
    score = (sim.max(-1).values if aggregate == "max" else sim.mean(-1)).numpy()
    order = np.lexsort((candidates, -score))
    return candidates[order], score[order]


def rank_by_probe(coef: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate columns by |probe weight|, largest first (ties: lower column id first); (columns, scores)."""
    score = np.abs(coef[candidates])
    order = np.lexsort((candidates, -score))
    return candidates[order], score[order]


@dataclass(frozen=True)
class _Plan:
    prompt: Prompt
    stage2: tuple[Feature, ...]                            # the whole stage-2 set: the FM's seeds come from it
    ranked: dict[str, tuple[np.ndarray, np.ndarray]]       # ranker -> (columns, scores), best first
    base: tuple[Feature, ...] = ()                         # what of it is ablated under the top-K (active or all)


def _plans(data: FmData, prompts: Sequence[Prompt], stage2: Mapping[str, Sequence[Feature]], V: torch.Tensor,
           coef: np.ndarray, settings: Stage3Settings,
           active: Mapping[str, Sequence[Feature]] | None = None) -> list[_Plan]:
    """Per prompt with a stage-2 latent among the FM columns: its rankings, and the stage-2 part ablated under
    the top-K (`active[prompt]` when given, else the whole set)."""
    row_of = {p: i for i, p in enumerate(data.prompt_ids)}
    depth = max((*settings.ks, *settings.probe_k_values), default=0)
    plans = []
    for prompt in prompts:
        layers, feats = zip(*stage2[prompt.prompt_id])
        in_fm = data.columns(layers, feats)
        seeds = in_fm[in_fm >= 0]
        if not len(seeds):
            continue
        r = row_of[prompt.prompt_id]
        pool = (data.indices[data.indptr[r]:data.indptr[r + 1]] if settings.candidates == "active"
                else np.arange(data.n_features))
        pool = np.setdiff1d(pool, seeds)
        fm_cols, fm_scores = rank_by_fm(V, seeds, pool, settings.aggregate)
        pr_cols, pr_scores = rank_by_probe(coef, pool)
        full = tuple(stage2[prompt.prompt_id])
        plans.append(_Plan(prompt, full,
                           {"fm": (fm_cols[:depth], fm_scores[:depth]), "probe": (pr_cols[:depth], pr_scores[:depth])},
                           full if active is None else tuple(active[prompt.prompt_id])))
    return plans


def top_k(plan: _Plan, ranker: str, k: int, data: FmData) -> list[Feature]:
    """The first k latents of `ranker` for this prompt as (layer, feature) pairs."""
    cols = plan.ranked[ranker][0][:k]
    return list(zip(data.layer[cols].tolist(), data.feature[cols].tolist()))


