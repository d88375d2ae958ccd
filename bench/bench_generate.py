"""Greedy generation through `extract` at several batch sizes: seconds, rows per second, the speedup over the
first batch size, and the share of completions identical to the first batch size's (padding and matmul shapes
change the last bits of fp32 arithmetic, which can flip a near-tie in the greedy argmax).

On a CPU a decode step costs about the same for 16 rows as for 64 (the weights are read once per step either
way; the prefill, by contrast, is compute-bound), so rows per second grow with the batch until the prefill
dominates. This is what sets the judged stages' default batch size (analyze/settings.py).

    python bench/bench_generate.py --n-prompts 64 --generate 32 --batch-sizes 8,16,32,64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extract.datasets import load_prompts  # noqa: E402
from extract.models import load_model  # noqa: E402
from extract.run import ExtractSettings, extract, make_items  # noqa: E402
from store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen-coder-0.5b")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    args = ap.parse_args()

    model = load_model(args.model, dtype=args.dtype)
    items = make_items(model, load_prompts("advbench", seed=0)[:args.n_prompts])
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"{args.model} ({model.dtype}), {len(items)} AdvBench prompts, {args.generate}-token greedy completions")
    base_s = base_ids = None
    for b in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store.create(Path(tmp) / "s")
            t0 = time.perf_counter()
            run = extract(store, model, items, (), ExtractSettings(positions="last:1", generate=args.generate,
                                                                   batch_size=b, sae_rows=False))
            seconds = time.perf_counter() - t0
            ids = np.asarray(store.open_array(run.run_id, "completion_ids")[:])
        base_s = base_s or seconds
        base_ids = ids if base_ids is None else base_ids
        same = float(np.mean([(a == c).all() for a, c in zip(ids, base_ids)]))
        print(f"batch {b:>3}: {seconds:6.1f} s, {len(items) / seconds:5.2f} rows/s, "
              f"speedup vs batch {sizes[0]} {base_s / seconds:4.2f}x, completions identical {same:.0%}", flush=True)


if __name__ == "__main__":
    main()
