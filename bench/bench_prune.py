"""Stage 2 speed: lockstep batched evaluation vs one forward per evaluation, same work, one process.

Takes the first --prompts prompts of a stage-1 (candidates) analysis in --store, cuts each pool to
its first --pool-size features, and runs Algorithm 1 (8 taus x 3 seeds) four ways, each into a
fresh scratch store so that nothing is a cache hit:
  one-by-one  one forward per evaluation (batch 1, no dedupe): every (prompt, tau, seed) run alone
  batched     one extraction run per step, --batch-size rows per forward, no dedupe
  lockstep    batched, and identical (prompt, set) rows of a step computed once (full forwards)
  prefix      lockstep with every step's forwards starting at the first ablated layer (the shipped path)
All should make the same decisions (the count that differ, from batch padding, is printed). Prints seconds, evaluations/s and the ratios.

    python bench/bench_prune.py --store stores/quick --prompts 2 --pool-size 100 --skip-one-by-one
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyze.catalog import latest_analysis  # noqa: E402
from analyze.common import ablation, evaluate, load_saes, stored_prompts  # noqa: E402
from analyze.prune import PruneSettings, _quiet, _stage1_sets, lockstep_prune  # noqa: E402
from extract.models import load_model  # noqa: E402
from store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="store holding a candidates analysis (stage 1)")
    ap.add_argument("--model", default="qwen-coder-0.5b")
    ap.add_argument("--candidates", default=None, help="candidates analysis id (default: the newest)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--pool-size", type=int, default=30, help="features per pool (the first, in (layer, feature) order)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip-one-by-one", action="store_true", help="leave out the slow one-forward-per-evaluation mode")
    ap.add_argument("--modes", default=None, help="a comma list of modes to run (e.g. lockstep,prefix)")
    args = ap.parse_args()

    model = load_model(args.model, device=args.device)
    source = Store.open(args.store)
    cand = latest_analysis(source, "candidates", model.name, args.candidates)
    chosen = source.sql("SELECT prompt_id FROM candidate_sets WHERE candidates_id = ? AND chosen ORDER BY prompt_id",
                        [cand["analysis_id"]])["prompt_id"].to_list()[:args.prompts]
    excluded = set(cand["settings"].get("exclude_layers", ()))
    saes = [s for s in load_saes(source, model, cand["settings"].get("saes", ())) if s.layer not in excluded]
    prompts = stored_prompts(source, chosen)
    pools = [set(sorted(p)[:args.pool_size]) for p in _stage1_sets(source, cand["analysis_id"], prompts)]
    settings = PruneSettings(batch_size=args.batch_size)

    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        scratch = Store.create(Path(tmp) / "p_full")
        p_full = evaluate(scratch, model, prompts, [ablation(sorted(p)) for p in pools], saes,   # warm-up too
                          _quiet(settings.batch_size, 0)).p_i
        full = replace(_quiet(settings.batch_size, 0), reuse_prefix=False)
        modes = {"one-by-one": (replace(settings, batch_size=1, dedupe=False), replace(full, batch_size=1)),
                 "batched": (replace(settings, dedupe=False), full), "lockstep": (settings, full),
                 "prefix": (settings, None)}
        if args.skip_one_by_one:
            del modes["one-by-one"]
        if args.modes:
            modes = {name: modes[name] for name in args.modes.split(",")}
        traces = {}
        for name, (mode, es) in modes.items():
            traces[name] = lockstep_prune(Store.create(Path(tmp) / name), model, saes, prompts, pools, p_full, mode,
                                          extract_settings=es)
    decisions = {name: t.steps.select("prompt_id", "tau", "seed", "step", "decision") for name, t in traces.items()}
    n_differ = sum(int((d["decision"] != decisions["lockstep"]["decision"]).sum()) for d in decisions.values())

    base = traces[next(n for n in ("one-by-one", "batched", "lockstep") if n in traces)]
    device = f"{model.device}, {torch.get_num_threads()} threads"
    print(f"stage 2 on {model.name} ({device}): {len(prompts)} prompts x {len(settings.taus)} taus x "
          f"{len(settings.seeds)} seeds, pools of {args.pool_size}, N={settings.block_size}, "
          f"{base.n_steps} steps, {base.n_evaluations} evaluations; decisions that differ between modes: {n_differ}")
    for name, trace in traces.items():
        print(f"  {name:<11} {trace.seconds:8.1f} s  {trace.n_forward_items:6d} forward rows  "
              f"{trace.n_evaluations / trace.seconds:6.1f} evaluations/s  "
              f"{trace.seconds / len(prompts):6.1f} s per prompt  ratio {base.seconds / trace.seconds:5.2f}")
    if "batched" in traces:
        print(f"lockstep batched evaluation vs {'one forward per evaluation' if 'one-by-one' in traces else 'batched'}: "
              f"{base.seconds:.1f} s -> {traces['lockstep'].seconds:.1f} s  ratio "
              f"{base.seconds / traces['lockstep'].seconds:.2f} (batching alone "
              f"{base.seconds / traces['batched'].seconds:.2f}, dedupe "
              f"{traces['batched'].seconds / traces['lockstep'].seconds:.2f})")
    lock, pre = traces["lockstep"], traces["prefix"]
    print(f"prefix reuse (forwards start at the first ablated layer, extract/prefix.py) vs the full-forward lockstep: "
          f"{lock.n_evaluations / lock.seconds:.2f} -> {pre.n_evaluations / pre.seconds:.2f} evaluations/s, "
          f"ratio {lock.seconds / pre.seconds:.2f}; decisions that differ: "
          f"{int((decisions['prefix']['decision'] != decisions['lockstep']['decision']).sum())} of {lock.n_evaluations}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
