"""Extraction overhead: `extract` into a store vs a bare forward over the same batches, same process.

usage: python bench/bench_extract.py [--model qwen-coder-0.5b] [--n-prompts 64] [--batch-size 16]
       python bench/bench_extract.py --peak-memory --n-prompts 1000     (peak RSS of one extraction)

Prints: bare forward (output_hidden_states=True, as the issue asks, and with logits_to_keep=1, the
fairer baseline), extraction without SAEs (hooks + store writes), and the SAE-encoding cost.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extract.datasets import load_prompts  # noqa: E402
from extract.models import load_model  # noqa: E402
from extract.run import ExtractSettings, SaeRef, _left_pad, extract, make_items, processing_order  # noqa: E402
from extract.saes import load_sae  # noqa: E402
from store import Store  # noqa: E402


def bare_forward(model, items, batch_size: int, keep_one: bool) -> float:
    order = processing_order(items)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            ids, mask, _ = _left_pad([items[i].chat.input_ids for i in order[k:k + batch_size]], model)
            kwargs = {"logits_to_keep": 1} if keep_one else {}
            model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    return time.perf_counter() - t0


def timed_extract(model, items, saes, settings) -> float:
    root = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        store = Store.create(root / "s")
        t0 = time.perf_counter()
        extract(store, model, items, saes, settings)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def random_saes(model, layers, d_sae: int, root: Path) -> list[SaeRef]:
    from tests.tiny_saes import build_tiny_sae   # a real sae-lens TopK SAE, random weights
    return [SaeRef(l, str(p), load_sae(str(p))) for l in layers
            for p in [build_tiny_sae("topk", model.d_model, d_sae, root / f"sae{l}", seed=l)]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen-coder-0.5b")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--peak-memory", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    half = args.n_prompts // 2
    prompts = load_prompts("advbench", limit=half) + load_prompts("alpaca", limit=args.n_prompts - half)
    items = make_items(model, prompts)
    n_tok = sum(len(it.chat.input_ids) for it in items)
    all_layers = tuple(range(model.n_layers))
    settings = ExtractSettings(layers=all_layers, batch_size=args.batch_size)
    where = f"({model.device}, {str(model.dtype).removeprefix('torch.')}, {len(items)} prompts, {n_tok} tokens, " \
            f"batch {args.batch_size}, all {model.n_layers} layers stored)"
    if args.peak_memory:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = timed_extract(model, items, [], settings)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak memory  {peak / 2**20:.2f} GiB RSS after extracting (model loaded: {before / 2**20:.2f} GiB), "
              f"{t:.1f} s, {len(items) / t:.1f} prompts/s {where}")
        return

    bare_forward(model, items[: args.batch_size], args.batch_size, True)            # warm-up
    t_bare = bare_forward(model, items, args.batch_size, keep_one=False)
    t_bare1 = bare_forward(model, items, args.batch_size, keep_one=True)
    t_ext = timed_extract(model, items, [], settings)
    print(f"extract overhead  bare forward {t_bare:.1f} s -> with store {t_ext:.1f} s  ratio {t_ext / t_bare:.2f}  {where}")
    print(f"extract overhead  bare forward, logits_to_keep=1 {t_bare1:.1f} s -> with store {t_ext:.1f} s  "
          f"ratio {t_ext / t_bare1:.2f}  (target <= 1.15)")
    with tempfile.TemporaryDirectory() as tmp:
        sae_layers = (6, 12, 18)
        saes = random_saes(model, sae_layers, 4096, Path(tmp))
        t_sae = timed_extract(model, items, saes, settings)
    print(f"SAE encoding      {len(sae_layers)} TopK SAEs of width 4096 at layers {sae_layers}: "
          f"{t_ext:.1f} s -> {t_sae:.1f} s  ratio {t_sae / t_ext:.2f}  "
          f"(+{(t_sae - t_ext) / len(sae_layers) / n_tok * 1e3:.3f} ms per token per layer)")


if __name__ == "__main__":
    main()
