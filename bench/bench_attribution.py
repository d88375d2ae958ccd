"""Stage 2 speed: the attribution-guided bisection vs Algorithm 1 in the paper's order, same prompts, one process.

Takes the first --prompts prompts of a stage-1 (candidates) analysis in --store (or, without --store,
the planted tiny model of tests/planted.py, built in a temporary directory), and runs stage 2's
search two ways at the paper's parameters (N = 5, 8 taus, 3 seeds), each into a fresh scratch store
so that nothing is a cache hit:
  paper   Algorithm 1, blocks in the seeds' random order (lockstep, as shipped)
  bisect  the gradient pass (attribution patching, timed and charged to it) plus the bisection over the
          attribution-sorted pool (analyze/bisect.py; --bisect-base), or with --order gallop the
          galloping search (analyze/gallop.py)
Prints seconds, evaluations, forward rows, and the wall-time ratio. With --tau-search descending or
--refine (analyze/descend.py), whose searches depend on the judge's verdicts, both sides are timed with
their jailbreak checks: the paper's sweep judges all 8 taus' sets, the other side judges as it goes.

    nice -n 10 python bench/bench_attribution.py --prompts 2 --pool-size 60 --store /work/stores/attribution
    python bench/bench_attribution.py            # the planted tiny model
    python bench/bench_attribution.py --order gallop --tau-search descending --refine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyze.catalog import latest_analysis  # noqa: E402
from analyze.common import ablation, evaluate, load_saes, stored_prompts  # noqa: E402
from analyze.judges import get_judge  # noqa: E402
from analyze.prune import PruneSettings, _quiet, _stage1_sets, lockstep_prune, search_and_judge  # noqa: E402
from extract.gradients import GradientSettings, attributions  # noqa: E402
from extract.models import load_model  # noqa: E402
from store import Store  # noqa: E402


def planted_store(tmp: Path):
    """The planted tiny model with its direction and stage-1 candidates, in a store under tmp."""
    from analyze import candidates, direction
    from tests.planted import build_planted, candidate_settings, direction_settings

    planted = build_planted(tmp / "planted")
    model = load_model(str(planted.model_dir))
    store = Store.create(tmp / "stage1")
    direction.run(store, model, direction_settings(planted))
    candidates.run(store, model, candidate_settings(planted))
    return store, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="store holding a candidates analysis (default: the planted model)")
    ap.add_argument("--model", default="qwen-coder-0.5b")
    ap.add_argument("--candidates", default=None, help="candidates analysis id (default: the newest)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--pool-size", type=int, default=0, help="features per pool, the first in (layer, feature) "
                                                             "order (0: the whole stage-1 set)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--order", default="bisect", choices=("bisect", "gallop"),
                    help="the attribution-guided search (analyze/bisect.py, analyze/gallop.py)")
    ap.add_argument("--bisect-base", default="pool", choices=("pool", "last_pass"),
                    help="what the bisection's delta is taken against (analyze/bisect.py)")
    ap.add_argument("--tau-search", default="sweep", choices=("sweep", "descending"),
                    help="descending: largest tau first, judged as it goes (analyze/descend.py)")
    ap.add_argument("--refine", action="store_true", help="search the selected sets again with blocks of one")
    ap.add_argument("--judge", default=None, help="judge of the jailbreak checks (default: the settings' default; "
                                                  "p_i on the planted model)")
    args = ap.parse_args()
    judged = args.tau_search != "sweep" or args.refine

    with tempfile.TemporaryDirectory(prefix="bench_attribution_") as tmp:
        tmp = Path(tmp)
        source, model = (Store.open(args.store), load_model(args.model)) if args.store else planted_store(tmp)
        cand = latest_analysis(source, "candidates", model.name, args.candidates)
        chosen = source.sql("SELECT prompt_id FROM candidate_sets WHERE candidates_id = ? AND chosen "
                            "ORDER BY prompt_id", [cand["analysis_id"]])["prompt_id"].to_list()[:args.prompts]
        excluded = set(cand["settings"].get("exclude_layers", ()))
        saes = [s for s in load_saes(source, model, cand["settings"].get("saes", ())) if s.layer not in excluded]
        prompts = stored_prompts(source, chosen)
        pools = [set(sorted(p)[:args.pool_size or None]) for p in _stage1_sets(source, cand["analysis_id"], prompts)]
        settings = PruneSettings(batch_size=args.batch_size,
                                 judge=args.judge or ("p_i" if not args.store else PruneSettings().judge))
        scratch = Store.create(tmp / "p_full")
        p_full = evaluate(scratch, model, prompts, [ablation(sorted(p)) for p in pools], saes,   # warm-up too
                          _quiet(settings.batch_size, 0)).p_i
        judge = get_judge(settings.judge)
        t0, paper_store = time.perf_counter(), Store.create(tmp / "paper")
        if judged:
            paper, _, paper_frame, _ = search_and_judge(paper_store, model, saes, prompts, pools, p_full, None, judge,
                                                        settings)
            paper = replace(paper, seconds=time.perf_counter() - t0)
        else:
            paper = lockstep_prune(paper_store, model, saes, prompts, pools, p_full, settings)
        t0 = time.perf_counter()
        found = attributions(model, prompts, saes, GradientSettings(batch_size=args.batch_size)).scores
        t_grad = time.perf_counter() - t0
        scores = [{(int(l), int(f)): s for l, f, s in found.filter(found["prompt_id"] == p.prompt_id)
                   .select("layer", "feature", "score").iter_rows()} for p in prompts]
        guided = replace(settings, order=args.order, bisect_base=args.bisect_base if args.order == "bisect" else "pool",
                         tau_search=args.tau_search, refine=args.refine)
        t0, store = time.perf_counter(), Store.create(tmp / "bisect")
        if judged:
            bisect, _, frame, _ = search_and_judge(store, model, saes, prompts, pools, p_full, scores, judge, guided)
            bisect = replace(bisect, seconds=time.perf_counter() - t0)
        else:
            bisect = lockstep_prune(store, model, saes, prompts, pools, p_full, guided, scores=scores)
    device = f"{model.device}, {torch.get_num_threads()} threads"
    sizes = sorted(len(p) for p in pools)
    print(f"stage 2 on {model.name} ({device}): {len(prompts)} prompts x {len(settings.taus)} taus x "
          f"{len(settings.seeds)} seeds, pools of {sizes[0]}..{sizes[-1]}, N={settings.block_size}")
    print(f"  paper   {paper.seconds:8.1f} s  {paper.n_evaluations:6d} evaluations  {paper.n_forward_items:6d} forward rows")
    total = t_grad + bisect.seconds
    label = args.order if args.order == "gallop" else f"bisect ({args.bisect_base})"
    label += ", descending" if args.tau_search == "descending" else ""
    label += ", refined" if args.refine else ""
    if judged:
        def chosen(frame):
            won = frame.filter(frame["selected"] & (frame["kind"] == "set"))
            return f"{int(won['jailbroken'].sum())}/{won.height} jailbroken, mean set {won['n_features'].mean():.1f}"
        print(f"  with the jailbreak checks ({settings.judge}): paper {chosen(paper_frame)}; {label}: {chosen(frame)}")
    print(f"  {label:<6}  {total:8.1f} s  {bisect.n_evaluations:6d} evaluations  {bisect.n_forward_items:6d} forward rows"
          f"  (gradient pass {t_grad:.1f} s + search{' and checks' if judged else ''} {bisect.seconds:.1f} s)")
    print(f"attribution-guided stage 2 vs paper-order stage 2: {paper.seconds:.1f} s -> {total:.1f} s  "
          f"ratio {paper.seconds / total:.2f}  ({paper.n_evaluations / max(bisect.n_evaluations, 1):.1f}x fewer "
          f"evaluations)")


if __name__ == "__main__":
    main()
