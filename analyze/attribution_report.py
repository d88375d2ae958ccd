"""The report's attribution section: predicted vs measured effects, cosine vs attribution ranking, stage-2 orders.

`render` is a report section renderer (analyze/report.py's SECTIONS); `rank_comparison` and
`order_comparison` are the tables it shows, usable on their own (the README's figures come from them).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from analyze.metrics import rate_text
from store import Store

CHECKS_SQL = """SELECT c.attribution_id, a.created_at, c.prompt_id, c.kind, c.layer, len(c.features) AS n_features,
       c.predicted_delta, c.measured_delta, c.predicted_dp, c.measured_dp
FROM attribution_checks c JOIN analyses a ON a.analysis_id = c.attribution_id
WHERE c.attribution_id = (SELECT analysis_id FROM analyses WHERE kind = 'attribution' ORDER BY created_at DESC LIMIT 1)"""

CORRELATIONS_SQL = """SELECT coalesce(CAST(layer AS VARCHAR), 'all') AS layer, kind, quantity, n,
       round(pearson, 3) AS pearson, round(spearman, 3) AS spearman
FROM attribution_correlations
WHERE attribution_id = (SELECT analysis_id FROM analyses WHERE kind = 'attribution' ORDER BY created_at DESC LIMIT 1)
ORDER BY quantity, layer NULLS FIRST, kind"""

TOP_SQL = """SELECT layer, feature, count(*) AS n_prompts, round(avg(score), 4) AS mean_score,
       round(min(score), 4) AS min_score
FROM attribution_scores
WHERE attribution_id = (SELECT analysis_id FROM analyses WHERE kind = 'attribution' ORDER BY created_at DESC LIMIT 1)
GROUP BY layer, feature ORDER BY sum(score) LIMIT 12"""

SQL = (CHECKS_SQL, CORRELATIONS_SQL, TOP_SQL)
N_CARDS = 6


def render(store: Store, frames: list[pl.DataFrame], sql: tuple[str, ...], settings: Any) -> list[Any]:
    """Scatter of predicted vs measured, correlations per layer, the ranking and order comparisons, cards."""
    from analyze.cards import CardSettings, cards
    from analyze.report import Card, Note, Table

    checks, correlations, top = frames
    parts = [_scatter(checks), Table(correlations, "Pearson and Spearman of predicted vs measured, per layer "
                                     "(dp: delta P(\"I\"); metric: delta of the attribution metric)", sql[1])]
    ranks = rank_comparison(store)
    if ranks.height:
        parts.append(Table(ranks, "stage 1, cosine vs attribution ranking: prompts jailbroken at some K, the K and "
                                  "set size needed (mean over the jailbroken prompts)"))
    orders = order_comparison(store)
    if orders.height:
        parts.append(Table(orders, "stage 2 by block order, beside the paper's random order on the same candidates, "
                                   "taus and seeds: evaluations per prompt, set size, ASR, Jaccard with the paper "
                                   "order's selected set"))
    parts.append(Table(top, "the most attributed latents (most negative predicted delta summed over prompts)", sql[2]))
    found = cards(store, [(int(l), int(f)) for l, f in top.head(N_CARDS).select("layer", "feature").iter_rows()],
                  CardSettings(n_contexts=getattr(settings, "n_contexts", 6)))
    if not found:
        parts.append(Note("none of the top-attributed latents fires in the store's unablated runs with SAE activations"))
    return parts + [Card(c) for c in found]


def _scatter(checks: pl.DataFrame):
    import matplotlib.pyplot as plt

    from analyze.report import _figure

    dp = checks["predicted_dp"].is_not_null().any()
    x, y = ("predicted_dp", "measured_dp") if dp else ("predicted_delta", "measured_delta")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (layer,), g in checks.sort("layer").group_by(["layer"], maintain_order=True):
        for kind, marker in (("single", "o"), ("block", "s")):
            part = g.filter(pl.col("kind") == kind)
            ax.scatter(part[x].to_numpy(), part[y].to_numpy(), s=14, marker=marker, alpha=0.7,
                       label=f"layer {layer} {kind}")
    lo = min(checks[x].min(), checks[y].min())
    hi = max(checks[x].max(), checks[y].max())
    ax.plot([lo, hi], [lo, hi], color="gray", linestyle=":", linewidth=1)
    what = 'delta P("I")' if dp else "delta metric"
    ax.set(xlabel=f"predicted {what} (attribution)", ylabel=f"measured {what} (real ablation)",
           title="Attribution vs real zero-ablation")
    ax.legend(fontsize=7, ncol=2)
    return _figure(fig, "attribution vs measured")


def rank_comparison(store: Store) -> pl.DataFrame:
    """Per candidates analysis: its ranking, prompts jailbroken (with CI), mean K and set size needed."""
    df = store.sql("""SELECT a.analysis_id AS candidates_id, coalesce(a.settings->>'rank', 'cosine') AS rank,
            a.created_at, s.prompt_id, s.k, s.n_features, s.chosen, s.verdict
        FROM analyses a JOIN candidate_sets s ON s.candidates_id = a.analysis_id WHERE a.kind = 'candidates'""")
    rows = []
    for (cid, rank), g in df.sort("created_at").group_by(["candidates_id", "rank"], maintain_order=True):
        refused = g.filter((pl.col("k") == 0) & (pl.col("verdict") == "refusal")).height
        chosen = g.filter(pl.col("chosen"))
        rows.append({"candidates_id": cid, "rank": rank, "n_refused": refused,
                     "jailbroken": rate_text(chosen.height, refused),
                     "mean_k": round(float(chosen["k"].mean()), 1) if chosen.height else None,
                     "mean_set_size": round(float(chosen["n_features"].mean()), 1) if chosen.height else None,
                     "k_per_prompt": " ".join(f"{p[:6]}:{k}" for p, k in chosen.sort("prompt_id")
                                              .select("prompt_id", "k").iter_rows())})
    return pl.DataFrame(rows)


def order_comparison(store: Store) -> pl.DataFrame:
    """Per prune analysis with a non-random order, beside each random-order one on the same candidates, taus, seeds."""
    df = store.sql("SELECT analysis_id, parent_id, settings, metrics, created_at FROM analyses WHERE kind = 'prune' "
                   "ORDER BY created_at")
    import json

    runs = [{**r, "settings": json.loads(r["settings"]), "metrics": json.loads(r["metrics"] or "{}")}
            for r in df.iter_rows(named=True)]
    key = lambda r: (r["parent_id"], tuple(r["settings"]["taus"]), tuple(r["settings"]["seeds"]),  # noqa: E731
                     r["settings"].get("max_prompts"), r["settings"].get("block_size"))
    rows = []
    for base in (r for r in runs if r["settings"].get("order", "random") == "random"
                 and r["settings"].get("tau_search", "sweep") == "sweep" and not r["settings"].get("refine")):
        group = [base] + [r for r in runs if key(r) == key(base) and r is not base and
                          (r["settings"].get("order", "random") != "random" or r["settings"].get("tau_search", "sweep")
                           != "sweep" or r["settings"].get("refine"))]
        if len(group) == 1:
            continue
        base_sets = _selected_sets(store, base["analysis_id"])
        for r in group:
            m, sets = r["metrics"], _selected_sets(store, r["analysis_id"])
            shared = sorted(set(sets) & set(base_sets))
            jaccard = [len(sets[p] & base_sets[p]) / len(sets[p] | base_sets[p]) for p in shared
                       if sets[p] | base_sets[p]]
            n = m.get("n_prompts") or 0
            order = r["settings"].get("order", "random")
            if r["settings"].get("bisect_base", "pool") != "pool":
                order += f" ({r['settings']['bisect_base']})"
            order += ", descending" if r["settings"].get("tau_search", "sweep") != "sweep" else ""
            order += ", refined" if r["settings"].get("refine") else ""
            rows.append({"prune_id": r["analysis_id"], "order": order,
                         "taus": len(r["settings"]["taus"]), "seeds": len(r["settings"]["seeds"]), "n_prompts": n,
                         "evaluations_per_prompt": round(m["n_evaluations"] / n, 1) if n else None,
                         "forward_rows_per_prompt": round(m["n_forward_items"] / n, 1) if n else None,
                         "judged_sets_per_prompt": round(m["n_judged_sets"] / n, 1) if n and "n_judged_sets" in m else None,
                         "mean_set_size": round(float(sum(len(s) for s in sets.values()) / len(sets)), 1) if sets else None,
                         "asr": rate_text(m.get("n_jailbroken", 0), n),
                         "jaccard_vs_random": round(sum(jaccard) / len(jaccard), 3) if jaccard else None,
                         "seconds_pruning": round(m.get("seconds_pruning", 0.0), 1)})
    return pl.DataFrame(rows) if rows else pl.DataFrame(schema={"prune_id": pl.String, "order": pl.String})


def _selected_sets(store: Store, prune_id: str) -> dict[str, frozenset[tuple[int, int]]]:
    df = store.sql("SELECT prompt_id, layer, feature FROM feature_sets WHERE set_id = ? AND stage = 2 AND selected",
                   [prune_id])
    sets: dict[str, set[tuple[int, int]]] = {}
    for prompt_id, layer, feature in df.iter_rows():
        sets.setdefault(prompt_id, set()).add((int(layer), int(feature)))
    return {p: frozenset(s) for p, s in sets.items()}
