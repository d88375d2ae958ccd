"""bf16 against fp32 on the default model: speed of the project's run path against bare transformers in each
dtype, how far P("I") moves, and how many stage-2 decisions agree.

1. Speed, per dtype, same prompts, same process: a bare batched forward (`logits_to_keep=1`) and a bare greedy
   `generate`, against `extract` (P("I") only; and with --generate N, P("I") from the generation's first step).
   The ratio bare / project is the share of bare speed the project reaches (the issue asks >= 0.8 in bf16).
2. P("I") of the same prompts, clean and under a 150-feature zero-ablation: the largest and mean |dP|.
3. Stage 2 (Algorithm 1, 8 taus x 3 seeds) on the first --prune-prompts stage-1 prompts of --store, pools cut
   to --pool-size, in both dtypes: the share of (prompt, tau, seed, step) decisions that agree, over the steps
   both runs reached with the same history (the first disagreement changes every later base set).

On a CPU without native bf16 (AVX2 only) bf16 is emulated and slower than fp32; `--dtype auto` picks fp32 there.

    python bench/bench_dtype.py --store stores/quick --n-prompts 16 --generate 16
    python bench/bench_dtype.py --store stores/quick --skip-speed      # fidelity only (2 and 3)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyze.catalog import latest_analysis  # noqa: E402
from analyze.common import ablation, evaluate, load_saes, stored_prompts  # noqa: E402
from analyze.prune import PruneSettings, _quiet, _stage1_sets, lockstep_prune  # noqa: E402
from extract.datasets import load_prompts  # noqa: E402
from extract.models import load_model, native_bf16  # noqa: E402
from extract.run import ExtractSettings, _left_pad, extract, make_items, processing_order  # noqa: E402
from store import Store  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed(model, prompts, batch_size: int, generate: int) -> dict[str, float]:
    """Seconds: bare forward, project P("I") run, bare generate, project generation run (fresh stores)."""
    items = make_items(model, prompts)
    order = processing_order(items)
    batches = [[items[i].chat.input_ids for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    eos = list(model.eos_token_ids)

    @torch.inference_mode()
    def bare(gen: int) -> None:
        for seqs in batches:
            ids, mask, _ = _left_pad(seqs, model)
            if gen:
                model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen, do_sample=False,
                                     eos_token_id=eos, pad_token_id=eos[0])
            else:
                model.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    def project(gen: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            extract(Store.create(Path(tmp) / "s"), model, items, (),
                    ExtractSettings(positions="last:1", generate=gen, batch_size=batch_size, sae_rows=False))

    bare(0)                                                           # warm-up
    out = {}
    for rep in range(2):                                              # alternate, keep the faster of two
        for name, fn in (("bare forward", lambda: bare(0)), ("project forward", lambda: project(0)),
                         ("bare generate", lambda: bare(generate)), ("project generate", lambda: project(generate))):
            out[name] = min(out.get(name, float("inf")), timed(fn))
    return out


def p_i(model, store, prompts, specs, saes) -> np.ndarray:
    return evaluate(store, model, prompts, specs, saes, _quiet(16, 0)).p_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="a store with trained SAEs and a candidates analysis")
    ap.add_argument("--model", default="qwen-coder-0.5b")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--generate", type=int, default=16)
    ap.add_argument("--prune-prompts", type=int, default=2)
    ap.add_argument("--pool-size", type=int, default=30)
    ap.add_argument("--skip-speed", action="store_true",
                    help="fidelity only (|dP| and stage-2 agreement): on a CPU without native bf16, bf16 is emulated "
                         "and its speed means nothing, while its arithmetic (bf16 operands, fp32 accumulation) is "
                         "what a native-bf16 CPU computes")
    args = ap.parse_args()

    source = Store.open(args.store)
    prompts = [p for p in load_prompts("advbench", seed=0)][:args.n_prompts]
    print(f"CPU native bf16: {native_bf16()}; {torch.get_num_threads()} threads")
    results, p_values, traces = {}, {}, {}
    rng = random.Random(0)
    for dtype in ("float32", "bfloat16"):
        model = load_model(args.model, dtype=dtype)
        saes = load_saes(source, model, ())
        layers = [s.layer for s in saes]
        if not p_values:
            feats = [(l, f) for l in layers for f in rng.sample(range(saes[0].d_sae), 150 // len(layers))]
        if not args.skip_speed:
            results[dtype] = speed(model, prompts, args.batch_size, args.generate)
        with tempfile.TemporaryDirectory() as tmp:
            store = Store.create(Path(tmp) / "s")
            p_values[dtype] = np.concatenate([p_i(model, store, prompts, [ablation([])] * len(prompts), saes),
                                              p_i(model, store, prompts, [ablation(feats)] * len(prompts), saes)])
            cand = latest_analysis(source, "candidates", model.name, None)
            chosen = source.sql("SELECT prompt_id FROM candidate_sets WHERE candidates_id = ? AND chosen "
                                "ORDER BY prompt_id", [cand["analysis_id"]])["prompt_id"].to_list()[:args.prune_prompts]
            s1 = stored_prompts(source, chosen)
            pools = [set(sorted(p)[:args.pool_size]) for p in _stage1_sets(source, cand["analysis_id"], s1)]
            p_full = evaluate(store, model, s1, [ablation(sorted(p)) for p in pools], saes, _quiet(32, 0)).p_i
            traces[dtype] = lockstep_prune(store, model, saes, s1, pools, p_full, PruneSettings())
        del model

    for dtype, r in results.items():
        print(f"{dtype:>9}: bare forward {r['bare forward']:.1f} s, project {r['project forward']:.1f} s "
              f"(bare/project {r['bare forward'] / r['project forward']:.2f}); bare generate {r['bare generate']:.1f} s, "
              f"project {r['project generate']:.1f} s (bare/project {r['bare generate'] / r['project generate']:.2f})")
    if results:
        f, b = results["float32"], results["bfloat16"]
        print(f"bf16 vs fp32 (fp32 time / bf16 time): forward {f['project forward'] / b['project forward']:.2f}, "
              f"generate {f['project generate'] / b['project generate']:.2f}")
    dp = np.abs(p_values["float32"] - p_values["bfloat16"])
    print(f"|dP(\"I\")| bf16 vs fp32 over {len(dp)} (prompt, clean or 150-feature ablation) pairs: "
          f"max {dp.max():.4f}, mean {dp.mean():.4f}")
    a, c = (traces[d].steps.sort("prompt_id", "tau", "seed", "step") for d in ("float32", "bfloat16"))
    same = agree = 0
    for key in sorted(set(zip(a["prompt_id"], a["tau"], a["seed"]))):
        da = a.filter((a["prompt_id"] == key[0]) & (a["tau"] == key[1]) & (a["seed"] == key[2]))["decision"].to_list()
        dc = c.filter((c["prompt_id"] == key[0]) & (c["tau"] == key[1]) & (c["seed"] == key[2]))["decision"].to_list()
        for x, y in zip(da, dc):
            same += 1
            if x != y:
                break
            agree += 1
    print(f"stage-2 decisions that agree (same history so far): {agree}/{same} ({agree / max(same, 1):.1%}); "
          f"runs whose whole decision sequence agrees: "
          f"{sum(1 for k in traces['float32'].kept if traces['float32'].kept[k] == traces['bfloat16'].kept[k])}"
          f"/{len(traces['float32'].kept)}")


if __name__ == "__main__":
    main()
